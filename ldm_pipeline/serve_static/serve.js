// The ldm-serve page: fills the form from /api/info, posts the settings to /api/generate and reads its
// server-sent events (queued, progress, done or error). Cancel aborts the request: the server cancels a job whose
// client disconnects. The settings of every finished request are kept in localStorage (History).
"use strict";

const HISTORY_KEY = "ldm-serve.history";
const HISTORY_SIZE = 30;
const form = document.getElementById("settings");
const button = document.getElementById("generate-button");
const cancelButton = document.getElementById("cancel-button");
const progress = document.getElementById("progress");
const statusText = document.getElementById("status-text");
const errorBox = document.getElementById("error");
const gallery = document.getElementById("gallery");
let info = null;
let running = null;  // the AbortController of the request in flight

// ------------------------------------------------------------------------------------------- the form

function setField(name, value) {
  const field = form.elements[name];
  if (!field || value === undefined || value === null) return;
  field.value = value;
  if (field.tagName === "SELECT" && field.value !== String(value)) field.value = String(info.defaults[name]);
}

function setFields(values) {
  for (const [name, value] of Object.entries(values)) setField(name, value);
}

function showMarkdown(id, html) {
  if (!html) return;
  const panel = document.getElementById(id);
  panel.querySelector(".markdown").innerHTML = html;  // rendered server-side with raw HTML escaped
  panel.hidden = false;
}

function showFacts(facts) {
  const list = document.getElementById("facts");
  for (const [label, value] of facts) {
    const term = document.createElement("dt");
    term.textContent = label;
    const description = document.createElement("dd");
    description.textContent = value;
    list.append(term, description);
  }
}

async function loadInfo() {
  const response = await fetch("/api/info");
  info = await response.json();
  if (!response.ok) throw new Error(info.message);
  document.getElementById("model-name").textContent = info.model;
  const scheduler = document.getElementById("scheduler");
  scheduler.add(new Option(`saved (${info.saved_scheduler})`, ""));
  for (const name of info.schedulers) scheduler.add(new Option(name, name));
  for (const side of ["width", "height"]) {
    const select = document.getElementById(side);
    for (const size of info.sizes) select.add(new Option(`${size} px`, size));
  }
  document.getElementById("num_images").max = info.limits.max_images;
  document.getElementById("steps").max = info.limits.max_steps;
  setFields(info.defaults);
  document.getElementById("hint").textContent =
    `At most ${info.limits.max_images} images, ${info.limits.max_steps} steps and ${info.limits.max_side} px a side. ` +
    `Seed: a number, or "random"; image i uses seed + i. Guidance σ range: two noise levels (e.g. "1 inf" ` +
    `guides only where σ > 1), or empty for every step. Ctrl+Enter generates.`;
  showFacts(info.facts);
  showMarkdown("model-card", info.model_card_html);
  showMarkdown("report", info.report_html);
  if (info.report_path) document.querySelector("#report .path").textContent = info.report_path;
  const history = readHistory();
  if (history.length) setFields(history[0].form);  // pick up where the last request left off
  showHistory();
}

// ------------------------------------------------------------------------------------------- history

function readHistory() {
  try {
    const history = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(history) ? history : [];
  } catch {
    return [];
  }
}

function remember(settings, seed) {
  const entry = {form: settings, seed, model: info.model};
  const key = JSON.stringify([settings, seed]);
  const history = [entry, ...readHistory().filter((old) => JSON.stringify([old.form, old.seed]) !== key)];
  try {
    localStorage.setItem(HISTORY_KEY, JSON.stringify(history.slice(0, HISTORY_SIZE)));
  } catch {
    // storage full or disabled: the history is a convenience
  }
  showHistory();
}

function showHistory() {
  const list = document.getElementById("history-list");
  const history = readHistory();
  list.replaceChildren();
  for (const entry of history) {
    const item = document.createElement("li");
    const use = document.createElement("button");
    use.type = "button";
    use.className = "link";
    use.textContent = entry.form.prompt || "(empty prompt)";
    use.title = "Use these settings and this seed";
    use.addEventListener("click", () => setFields({...entry.form, seed: entry.seed}));
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `seed ${entry.seed} · ${entry.form.num_images} image(s) · ${entry.form.steps} steps · ` +
      `${entry.form.scheduler || "saved scheduler"} · ${entry.form.width}x${entry.form.height}` +
      (entry.model === info.model ? "" : ` · made with ${entry.model}`);
    item.append(use, meta);
    list.append(item);
  }
  document.getElementById("history").hidden = history.length === 0;
}

document.getElementById("clear-history").addEventListener("click", () => {
  localStorage.removeItem(HISTORY_KEY);
  showHistory();
});

// ------------------------------------------------------------------------------------------- a request

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  statusText.textContent = "";
}

function setRunning(controller) {
  running = controller;
  button.disabled = controller !== null;
  cancelButton.hidden = controller === null;
  progress.hidden = controller === null;  // the bar shows only while a request runs
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
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "link reuse-seed";
    reuse.textContent = "reuse seed";
    reuse.addEventListener("click", () => setField("seed", image.metadata.seed));
    const link = document.createElement("a");
    link.href = image.src;
    link.download = image.filename;
    link.textContent = "PNG";
    caption.append(seed, reuse, link);
    figure.append(img, caption);
    gallery.append(figure);
  }
}

function handleEvent(event, settings) {
  if (event.type === "queued") {
    statusText.textContent = event.ahead ? `waiting: ${event.ahead} request(s) ahead` : "starting";
  } else if (event.type === "progress") {
    progress.max = event.total;
    progress.value = event.step;
    statusText.textContent = `step ${event.step} / ${event.total}`;
  } else if (event.type === "done") {
    const seeds = event.images.map((image) => image.metadata.seed);
    statusText.textContent = `${event.images.length} image(s), seed ${seeds[0]}` +
      (seeds.length > 1 ? ` to ${seeds[seeds.length - 1]}` : "");
    showImages(event.images);
    remember(settings, seeds[0]);
  } else if (event.type === "error") {
    showError(event.message);
  }
}

async function readEvents(response, settings) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (block.startsWith("data: ")) handleEvent(JSON.parse(block.slice(6)), settings);
    }
  }
}

async function generate(submit) {
  submit.preventDefault();
  if (running) return;
  const settings = Object.fromEntries(new FormData(form));
  const controller = new AbortController();
  errorBox.hidden = true;
  progress.removeAttribute("value");
  statusText.textContent = "sending";
  setRunning(controller);
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(settings),
      signal: controller.signal,
    });
    if (response.ok) await readEvents(response, settings);
    else handleEvent(await response.json(), settings);
  } catch (error) {
    if (error.name === "AbortError") statusText.textContent = "Cancelled.";
    else showError(`The server did not answer: ${error.message}`);
  } finally {
    setRunning(null);
  }
}

form.addEventListener("submit", generate);
cancelButton.addEventListener("click", () => running && running.abort());
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    event.preventDefault();
    if (!running) form.requestSubmit();
  }
});
loadInfo().catch((error) => showError(`Could not load the model's settings: ${error.message}`));
