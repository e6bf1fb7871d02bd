// The ldm-serve page: fills the form from /api/info, posts the settings to /api/generate and reads its
// server-sent events (queued, progress, done or error).
"use strict";

const form = document.getElementById("settings");
const button = document.getElementById("generate-button");
const statusBox = document.getElementById("status");
const progress = document.getElementById("progress");
const statusText = document.getElementById("status-text");
const errorBox = document.getElementById("error");
const gallery = document.getElementById("gallery");

function showMarkdown(id, html) {
  const panel = document.getElementById(id);
  if (!html) return false;
  panel.querySelector(".markdown").innerHTML = html;  // rendered server-side with raw HTML escaped
  panel.hidden = false;
  return true;
}

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  document.getElementById("model-name").textContent = info.model;
  const select = document.getElementById("scheduler");
  select.add(new Option(`saved (${info.saved_scheduler})`, ""));
  for (const name of info.schedulers) select.add(new Option(name, name));
  for (const side of ["width", "height"]) {
    const input = document.getElementById(side);
    input.value = info[side];
    input.step = info.vae_scale_factor;
    input.min = info.vae_scale_factor;
    input.max = info.max_side;
  }
  document.getElementById("num_images").max = info.max_images;
  document.getElementById("size-hint").textContent =
    `Width and height: multiples of ${info.vae_scale_factor} (the VAE factor), at most ${info.max_side} px. ` +
    `Seed: a number, or "random"; image i uses seed + i.`;
  const shown = [showMarkdown("model-card", info.model_card_html), showMarkdown("report", info.report_html)];
  if (info.report_path) document.querySelector("#report .path").textContent = info.report_path;
  document.getElementById("no-card").hidden = shown.some(Boolean);
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function showImages(images) {
  gallery.replaceChildren();
  for (const image of images) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.src;
    img.alt = image.metadata.prompt;
    img.title = Object.entries(image.metadata).map(([key, value]) => `${key}: ${value}`).join("\n");
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.textContent = `seed ${image.metadata.seed} · ${image.metadata.size}`;
    const link = document.createElement("a");
    link.href = image.src;
    link.download = image.filename;
    link.textContent = "PNG";
    caption.append(seed, link);
    figure.append(img, caption);
    gallery.append(figure);
  }
}

function handleEvent(event) {
  if (event.type === "queued") {
    statusText.textContent = event.ahead ? `waiting: ${event.ahead} request(s) ahead` : "starting";
  } else if (event.type === "progress") {
    progress.max = event.total;
    progress.value = event.step;
    statusText.textContent = `step ${event.step} / ${event.total}`;
  } else if (event.type === "done") {
    statusText.textContent = `${event.images.length} image(s)`;
    showImages(event.images);
  } else if (event.type === "error") {
    statusBox.hidden = true;
    showError(event.message);
  }
}

async function generate(submit) {
  submit.preventDefault();
  const settings = Object.fromEntries(new FormData(form));
  errorBox.hidden = true;
  button.disabled = true;
  progress.removeAttribute("value");
  statusText.textContent = "sending";
  statusBox.hidden = false;
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(settings),
    });
    if (!response.ok) {
      handleEvent(await response.json());
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (line.startsWith("data: ")) handleEvent(JSON.parse(line.slice(6)));
      }
    }
  } catch (error) {
    statusBox.hidden = true;
    showError(`The server did not answer: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

form.addEventListener("submit", generate);
loadInfo().catch((error) => showError(`Could not load the model's settings: ${error.message}`));
