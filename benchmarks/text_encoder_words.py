"""How well a text encoder keeps apart prompts that differ in one word (the U-Net can only follow what it sees).

    python benchmarks/text_encoder_words.py --text_encoder runs/demo/text_encoder_stage

For each word family of the ``shapes`` grammar (colours, kinds) it encodes the prompts of one template that
differ only in that word, e.g. "a red cat", "a blue cat", ..., and prints, for the hidden state at the word's
position (what cross-attention reads) and for the pooled output, the cosine similarity

    cos(h_a, h_b) = <h_a, h_b> / (|h_a| |h_b|)

of the closest pair and the mean over all pairs. A closest pair near 1 is a pair the U-Net cannot tell apart:
with the first demo's text encoder (batch 64) "green"/"brown" were at 0.99 and "blue"/"purple" at 0.98, and the
U-Net drew green for brown and blue for purple.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from ldm_pipeline.data.shapes import COLORS, OBJECT_KINDS
from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.text_encoder import load_pretrained_text_encoder

FAMILIES = {
    "colour": ("a {} cat", tuple(COLORS)),
    "kind": ("a red {}", OBJECT_KINDS),
}


@torch.no_grad()
def word_similarities(tokenizer, text_encoder, template: str, words) -> dict:
    """Closest pair and mean pairwise cosine similarity of the word-position hidden states and of the pooled
    outputs of ``template.format(word)`` for each word."""
    prompts = [template.format(word) for word in words]
    tokens = tokenize_prompts(tokenizer, prompts)
    output = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    prefix = tokenizer(template.split("{}")[0].strip(), add_special_tokens=True).input_ids
    position = len(prefix) - (1 if tokenizer.eos_token_id in prefix else 0)
    states = {"word state": output.last_hidden_state[:, position]}
    if getattr(output, "pooler_output", None) is not None:
        states["pooled"] = output.pooler_output
    result = {}
    for name, vectors in states.items():
        similarity = F.normalize(vectors, dim=-1) @ F.normalize(vectors, dim=-1).T
        pairs = [(float(similarity[i, j]), words[i], words[j]) for i, j in itertools.combinations(range(len(words)), 2)]
        closest = max(pairs)
        result[name] = {"closest": closest, "mean": sum(p[0] for p in pairs) / len(pairs)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_encoder", required=True, help="Text stage output, pipeline dir or Hub name.")
    args = parser.parse_args()
    tokenizer, text_encoder = load_pretrained_text_encoder(args.text_encoder)
    text_encoder.eval()
    print(f"{'family':<8}{'state':<12}{'closest pair':>28}{'mean':>8}")
    for family, (template, words) in FAMILIES.items():
        for name, stats in word_similarities(tokenizer, text_encoder, template, list(words)).items():
            similarity, a, b = stats["closest"]
            print(f"{family:<8}{name:<12}{f'{a}/{b} {similarity:.2f}':>28}{stats['mean']:>8.2f}")


if __name__ == "__main__":
    main()
