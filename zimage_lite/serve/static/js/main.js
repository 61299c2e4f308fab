// The page: wires the form, the mask painter, the jobs API and the gallery together.
import * as api from "./api.js";
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
  cancelled: false,
};

const painter = new MaskPainter($("mask-canvas"));
const gallery = new Gallery($("gallery"), $("gallery-empty"), restore);

function applyModel(model) {
  state.model = model;
  const base = model.variant === "base";
  for (const el of document.querySelectorAll("[data-base-only]")) el.hidden = !base;
  $("control-field").hidden = !model.controlnet;
  $("lora-field").hidden = model.loras.length === 0;
  loraList($("lora-list"), model.loras);
  const d = model.defaults;
  if (d.steps) $("steps").value = d.steps;
  if (d.guidance !== undefined && d.guidance !== null) $("guidance").value = d.guidance;
  $("model-info").textContent = `${model.id} · ${model.variant}`;
}

async function connect() {
  try {
    applyModel(await api.describe());
  } catch (exc) {
    $("model-info").textContent = `The server did not answer: ${exc.message}`;
  }
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
  state.init = { blob, name };
  $("init-preview").src = URL.createObjectURL(blob);
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

function progress(update) {
  const bar = $("progress");
  if (update.queue_position !== undefined && update.queue_position !== null && update.state === "queued") {
    $("queue").textContent =
      update.queue_position > 0 ? `Queue position ${update.queue_position}` : "Next in the queue";
    $("progress-label").textContent = "Waiting";
  }
  if (update.steps) {
    bar.max = update.steps;
    bar.value = update.step;
    $("progress-label").textContent = `Step ${update.step} of ${update.steps}`;
    $("queue").textContent = "";
  }
}

async function files(settings) {
  const out = {};
  if (state.init) {
    out.image = state.init.blob;
    if (painter.painted()) out.mask = await painter.blob();
  }
  if (state.model.controlnet && state.control) out.control_image = state.control;
  return out;
}

function requestOf(settings, attached) {
  const body = form.request(settings, state.model);
  if (attached.image) body.strength = settings.strength;
  if (attached.control_image) body.control_scale = settings.control_scale;
  return body;
}

async function generate(event) {
  event.preventDefault();
  form.clearErrors();
  const settings = form.read(readLoras($("lora-list")));
  if (settings.seed_mode === "random") settings.seed = form.randomSeed();
  const seedProblem = form.checkSeed(settings.seed);
  if (seedProblem) return void form.showError("seed", seedProblem);
  setRunning(true);
  state.cancelled = false;
  $("progress").value = 0;
  $("progress-label").textContent = "Submitting";
  if (!matchMedia("(min-width: 900px)").matches) $("progress").scrollIntoView({ block: "center" }); // a phone
  try {
    const attached = await files(settings);
    const submitted = await api.submit(requestOf(settings, attached), attached);
    state.jobId = submitted.id;
    progress(submitted);
    const done = await api.watch(submitted.id, progress);
    await finished(done, settings);
  } catch (exc) {
    failed(exc);
  } finally {
    state.jobId = null;
    setRunning(false);
  }
}

async function finished(job, settings) {
  if (job.state === "cancelled") {
    $("progress-label").textContent = "Cancelled";
    $("progress").value = 0;
    return;
  }
  if (job.state !== "succeeded") {
    const err = job.error || {};
    throw new api.ApiError(err.message || `the job ended as ${job.state}`, { param: err.param });
  }
  const items = (job.result && job.result.data) || [];
  $("progress").value = $("progress").max;
  $("progress-label").textContent = `Done: ${items.length} image${items.length === 1 ? "" : "s"}`;
  $("last-seed").value = settings.seed;
  $("last-seed-line").hidden = false;
  const init = state.init ? { ...state.init, mask: painter.snapshot() } : null;
  const blobs = await Promise.all(items.map(api.imageBlob));
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
  $("progress-label").textContent = "Failed";
  if (state.cancelled) return;
  form.showError(exc.param, exc.message);
}

async function cancel() {
  if (!state.jobId) return;
  state.cancelled = true;
  $("cancel").disabled = true;
  $("progress-label").textContent = "Cancelling";
  try {
    await api.cancel(state.jobId);
  } catch (exc) {
    form.showError(null, exc.message);
  }
}

async function restore(entry) {
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
  connect();
}

main();
