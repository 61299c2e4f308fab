// The page: wires the form, the mask painter, the jobs API and the gallery together.
import * as api from "./api.js";
import * as exif from "./exif.js";
import * as form from "./form.js";
import { Gallery, describe } from "./gallery.js";
import { loraList, readLoras, writeLoras } from "./loras.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);

const state = {
  model: { variant: "turbo", loras: [], controlnet: false, defaults: {} },
  init: null, // {blob, name} of the init image
  control: null, // the ControlNet image file
  jobId: null,
};

const painter = new MaskPainter($("mask-canvas"));
const gallery = new Gallery($("gallery"), $("gallery-empty"), restore);

function applyModel(info) {
  state.model = info;
  const base = info.variant === "base";
  for (const el of document.querySelectorAll("[data-base-only]")) el.hidden = !base;
  $("control-field").hidden = !info.controlnet;
  $("lora-field").hidden = info.loras.length === 0;
  loraList($("lora-list"), info.loras);
  const d = info.defaults || {};
  if (d.steps) $("steps").value = d.steps;
  const guidance = (info.model_defaults || {}).guidance ?? d.guidance; // the variant's, e.g. base 4
  if (guidance !== undefined) $("guidance").value = guidance;
  if (d.size && /^\d+x\d+$/.test(d.size)) form.setSize(...d.size.split("x").map(Number));
  const limits = info.limits || {};
  if (limits.max_steps) $("steps").max = limits.max_steps;
  if (limits.max_n) $("n").max = limits.max_n;
  $("model-info").textContent = `${info.model} · ${info.variant} · ${info.device}`;
}

// The form as it was at the last Generate, kept across reloads (images are not: they stay in the tab).
const SAVED = "zimage-lite-settings";

function remember(settings) {
  try {
    localStorage.setItem(SAVED, JSON.stringify(settings));
  } catch {
    // storage full or off: the form simply starts from the defaults next time
  }
}

function recall() {
  let s = null;
  try {
    s = JSON.parse(localStorage.getItem(SAVED));
  } catch {
    return;
  }
  if (!s || typeof s.prompt !== "string") return;
  form.write(s);
  writeLoras($("lora-list"), s.loras || []);
  if (s.seed_mode === "random") {
    $("seed-random").checked = true;
    form.syncSeed();
  }
}

async function connect(first = false) {
  try {
    applyModel(await api.describe());
    $("key-form").hidden = true;
    if (first) recall();
  } catch (exc) {
    if (exc.status === 503) {
      // the model is still loading: ask again shortly
      $("model-info").textContent = `${exc.message}…`;
      setTimeout(() => connect(first), 2000);
      return;
    }
    if (exc.status !== 401) {
      $("model-info").textContent = `The server did not answer: ${exc.message}`;
      return;
    }
    // serve --api-key: ask for it; a wrong one is said next to the field
    $("model-info").textContent = "This server needs its API key.";
    const asked = !$("key-form").hidden;
    $("key-form").hidden = false;
    if (asked) form.showError("api_key", exc.message);
    $("api-key").focus();
  }
}

function wireKey() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("api-key-error").hidden = true;
    api.setKey($("api-key").value);
    connect(true);
  });
}

// ---- init image, drag and drop, mask ----

async function setInit(blob, name = "image") {
  $("image-error").hidden = true;
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    form.showError("image", `${name}: this file is not an image the browser can read.`);
    return false;
  }
  if ((await exif.orientation(blob)) !== 1) blob = await exif.upright(bitmap); // the server ignores EXIF
  state.init = { blob, name };
  const preview = $("init-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src); // the gallery keeps its own blobs
  preview.src = URL.createObjectURL(blob);
  painter.reset(bitmap.width, bitmap.height);
  $("init-tools").hidden = false;
  // Output size from the image, as the CLI does: sides rounded down to 16, scaled to at most ~1 MP.
  const scale = Math.min(1, Math.sqrt((1024 * 1024) / (bitmap.width * bitmap.height)));
  const side = (v) => Math.max(16, Math.floor((v * scale) / 16) * 16);
  form.setSize(side(bitmap.width), side(bitmap.height));
  bitmap.close();
  return true;
}

function removeInit() {
  state.init = null;
  $("init-image").value = "";
  $("init-tools").hidden = true;
  $("init-preview").removeAttribute("src");
  painter.reset(0, 0);
}

function wireInit() {
  $("init-image").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setInit(file, file.name);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setInit(file, file.name);
  });
  $("strength").addEventListener("input", (e) => ($("strength-out").value = Number(e.target.value).toFixed(2)));
  $("brush-size").addEventListener("input", (e) => (painter.brush = Number(e.target.value)));
  for (const id of ["tool-paint", "tool-erase"]) {
    $(id).addEventListener("change", () => (painter.erase = $("tool-erase").checked));
  }
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("mask-invert").addEventListener("click", () => painter.invert());
  $("init-remove").addEventListener("click", removeInit);
  $("control-image").addEventListener("change", (e) => (state.control = e.target.files[0] || null));
  $("control-scale").addEventListener("input", (e) => {
    $("control-scale-out").value = Number(e.target.value).toFixed(2);
  });
}

// ---- a job: submit, follow, collect ----

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("settings").setAttribute("aria-busy", String(running));
}

function onEvent(name, data) {
  if (name === "queued") {
    $("queue").textContent = data.position > 0 ? `Queue position ${data.position + 1}` : "Next in the queue";
    $("progress-label").textContent = "Waiting";
  } else if (name === "progress") {
    const bar = $("progress");
    bar.max = data.steps;
    bar.value = data.step;
    const pass = data.passes > 1 ? ` (${data.pass === 1 ? "first pass" : "hires pass"})` : "";
    $("progress-label").textContent = `Step ${data.step} of ${data.steps}${pass}`;
    $("queue").textContent = "";
  }
}

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new api.ApiError(`cannot read the file (${reader.error})`, { param: "image" }));
    reader.readAsDataURL(blob);
  });
}

async function requestOf(settings) {
  const body = form.request(settings, state.model);
  if (state.init) {
    body.image = await dataUrl(state.init.blob);
    body.strength = settings.strength;
    if (painter.painted()) body.mask = await dataUrl(await painter.blob());
  }
  if (state.model.controlnet && state.control) {
    body.control_image = await dataUrl(state.control);
    body.control_scale = settings.control_scale;
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  form.clearErrors();
  const settings = form.read(readLoras($("lora-list")));
  remember(settings);
  if (settings.seed_mode === "random") settings.seed = form.randomSeed();
  const seedProblem = form.checkSeed(settings.seed);
  if (seedProblem) return void form.showError("seed", seedProblem);
  setRunning(true);
  $("progress").value = 0;
  $("progress-label").textContent = "Submitting";
  $("queue").textContent = "";
  if (!matchMedia("(min-width: 900px)").matches) $("progress").scrollIntoView({ block: "center" }); // a phone
  try {
    const job = await api.submit(await requestOf(settings));
    state.jobId = job.id;
    if (job.state === "queued") onEvent("queued", job);
    const [name, data] = await api.follow(job.id, onEvent);
    if (name === "result") await finished(data, settings);
    else if (data.state === "cancelled") cancelled();
    else throw api.fromBody(data.error);
  } catch (exc) {
    failed(exc);
  } finally {
    state.jobId = null;
    setRunning(false);
  }
}

function announce(text) {
  // the bar's label changes every step; screen readers hear only how a job ended
  $("progress-label").textContent = text;
  $("announce").textContent = text;
}

function cancelled() {
  announce("Cancelled");
  $("progress").value = 0;
  $("queue").textContent = "";
}

async function finished(job, settings) {
  const results = job.results || [];
  const blobs = await Promise.all(results.map(api.imageBlob));
  $("progress").value = $("progress").max;
  announce(`Done: ${results.length} image${results.length === 1 ? "" : "s"}`);
  $("last-seed").value = String(job.seed);
  $("last-seed-line").hidden = false;
  const init = state.init ? { ...state.init, mask: painter.snapshot() } : null;
  let entry;
  for (let index = blobs.length - 1; index >= 0; index--) {
    entry = gallery.add({ blob: blobs[index], settings, init, index }); // image 1 ends on top
  }
  if (entry) show(entry);
}

function show(entry) {
  $("current-img").src = entry.url;
  $("current-img").alt = `Generated: ${entry.settings.prompt}`;
  $("current-caption").textContent = describe(entry.settings, entry.index);
  $("current").hidden = false;
}

function failed(exc) {
  announce("Failed");
  $("queue").textContent = "";
  form.showError(exc.param, exc.message);
}

async function cancel() {
  if (!state.jobId) return;
  $("cancel").disabled = true;
  $("progress-label").textContent = "Cancelling";
  try {
    await api.cancel(state.jobId);
  } catch (exc) {
    if (exc.status !== 409) form.showError(null, exc.message); // 409: it ended first; its result shows
  }
}

async function restore(entry) {
  show(entry);
  form.clearErrors();
  form.write(entry.settings);
  writeLoras($("lora-list"), entry.settings.loras);
  if (entry.init) {
    await setInit(entry.init.blob, entry.init.name);
    painter.restore(entry.init.mask);
  } else if (state.init) {
    removeInit();
  }
  form.setSize(entry.settings.width, entry.settings.height);
  $("prompt").focus();
}

function main() {
  form.syncSize();
  form.syncSeed();
  $("size-preset").addEventListener("change", form.syncSize);
  for (const id of ["seed-random", "seed-fixed"]) $(id).addEventListener("change", form.syncSeed);
  $("reuse-seed").addEventListener("click", () => {
    $("seed-fixed").checked = true;
    $("seed").value = $("last-seed").value;
    form.syncSeed();
    $("seed").focus();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("settings").requestSubmit();
  });
  $("settings").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  wireInit();
  wireKey();
  connect(true);
}

main();
