// The server's routes, as any client uses them: GET /v1/models, the jobs API and its SSE events.
// Nothing here knows about the page; every other module talks to the server through these functions.

export class ApiError extends Error {
  // `param` names the request field the server refused (OpenAI's error shape), so the page can show the
  // message next to that control.
  constructor(message, { param = null, code = null, status = 0 } = {}) {
    super(message);
    this.param = param;
    this.code = code;
    this.status = status;
  }
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status line is all there is
  }
  const err = body && body.error;
  if (err && err.message) {
    return new ApiError(err.message, { param: err.param, code: err.code, status: response.status });
  }
  const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
  return new ApiError(`${response.status} ${detail}`, { status: response.status });
}

async function call(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (exc) {
    throw new ApiError(`the server cannot be reached (${exc.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function describe() {
  const body = await (await call("/v1/models")).json();
  const model = (body.data && body.data[0]) || {};
  return {
    id: model.id || "model",
    variant: model.variant || "turbo",
    loras: model.loras || [],
    controlnet: Boolean(model.controlnet),
    defaults: model.defaults || {},
    limits: model.limits || {},
  };
}

export async function submit(request, files) {
  // JSON when there is no image; multipart (as /v1/images/edits takes it) when there is one.
  let options;
  if (Object.keys(files).length === 0) {
    options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) };
  } else {
    const form = new FormData();
    for (const [key, value] of Object.entries(request)) {
      form.append(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    for (const [key, blob] of Object.entries(files)) form.append(key, blob, `${key}.png`);
    options = { method: "POST", body: form };
  }
  return (await call("/v1/jobs", options)).json();
}

export async function job(id) {
  return (await call(`/v1/jobs/${encodeURIComponent(id)}`)).json();
}

export async function cancel(id) {
  await call(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function isFinal(state) {
  return FINAL.has(state);
}

export function watch(id, onUpdate) {
  // Calls onUpdate(update) with each SSE event's JSON ({state, step, steps, queue_position, ...}) and
  // resolves with the final job (GET /v1/jobs/{id}) once the stream says the job ended.
  return new Promise((resolve, reject) => {
    const source = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
    const finish = async () => {
      source.close();
      try {
        resolve(await job(id));
      } catch (exc) {
        reject(exc);
      }
    };
    const handle = (event) => {
      let update;
      try {
        update = JSON.parse(event.data);
      } catch {
        return;
      }
      onUpdate(update);
      if (isFinal(update.state)) finish();
    };
    for (const name of ["message", "queued", "running", "step", "succeeded", "failed", "cancelled"]) {
      source.addEventListener(name, handle);
    }
    // The stream closes when the job ends; EventSource would reconnect, so ask the job instead.
    source.onerror = finish;
  });
}

export async function imageBlob(item) {
  // The server's PNG bytes, untouched, so a download keeps the metadata it wrote.
  if (item.b64_json) {
    const bytes = Uint8Array.from(atob(item.b64_json), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: "image/png" });
  }
  return (await call(item.url)).blob();
}
