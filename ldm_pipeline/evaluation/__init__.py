"""Evaluation: GenEval-style prompt-following scores and FIDs from pixels alone (see ``ldm-eval``)."""

from .classifier import ObjectClassifier, load_object_classifier
from .detector import DetectedObject, ObjectDetector
from .fid import frechet_distance, frechet_distance_of_features
from .scoring import EvalPrompt, GenEvalScorer, Judgement, judge, make_prompt_set, render_prompt_set, summarize
