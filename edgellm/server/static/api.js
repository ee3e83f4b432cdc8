// The page's side of edgellm's HTTP API: the API key, streamed chat completions (server-sent events over
// fetch), cancellation and the server's info. Every URL is relative to the page, so the page talks only
// to the server that served it (the Content-Security-Policy allows nothing else).

const KEY = 'edgellm.apiKey';
let askKey = async () => false; // set by the page: shows the key dialog, resolves true when a key was given

export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setKeyPrompt(fn) {
  askKey = fn;
}

export function apiKey() {
  return localStorage.getItem(KEY) || '';
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

/** fetch with the stored key; on 401 asks for a key (once per attempt) and retries. */
export async function apiFetch(path, opts = {}) {
  for (;;) {
    const headers = new Headers(opts.headers || {});
    const key = apiKey();
    if (key) headers.set('Authorization', 'Bearer ' + key);
    let res;
    try {
      res = await fetch(path, { ...opts, headers, cache: 'no-store' });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError('cannot reach the edgellm server (is it still running?)');
    }
    if (res.status !== 401) return res;
    if (!(await askKey(Boolean(key)))) throw await errorOf(res);
  }
}

async function errorOf(res) {
  try {
    const body = await res.json();
    const err = body.error || {};
    return new ApiError(err.message || `HTTP ${res.status}`, res.status, err.code || null);
  } catch {
    return new ApiError(`HTTP ${res.status}`, res.status);
  }
}

/** GET /health (open without a key): tells whether the server wants one. */
export async function health() {
  const res = await fetch('health', { cache: 'no-store' });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

export async function info() {
  const res = await apiFetch('v1/edgellm/info');
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

/** Ask the server to stop answer `id` (its slot is freed at the next step). True when it will (or the answer
 * had already finished: 404), so its stream ends by itself. */
export async function cancel(id) {
  const res = await apiFetch('v1/edgellm/cancel/' + encodeURIComponent(id), { method: 'POST' });
  return res.ok || res.status === 404;
}

/**
 * POST /v1/chat/completions with stream: true. Calls onStart(id) when the answer's id arrives (first
 * event, before any token) and onText(text) with the text of each network read as soon as it arrives.
 * Resolves with {id, finish, stats, usage}.
 */
export async function streamChat(body, { signal, onStart, onText }) {
  const res = await apiFetch('v1/chat/completions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!res.ok) throw await errorOf(res);
  const out = { id: null, finish: null, stats: null, usage: null };
  const reader = res.body.getReader();
  const utf8 = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return out;
    buf += utf8.decode(value, { stream: true });
    let text = '';
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') {
          if (text) onText(text);
          return out;
        }
        const msg = JSON.parse(data);
        if (msg.error) throw new ApiError(msg.error.message, 0, msg.error.code);
        if (msg.id && !out.id) {
          out.id = msg.id;
          onStart?.(msg.id);
        }
        if (msg.usage) out.usage = msg.usage;
        if (msg.stats) out.stats = msg.stats;
        for (const c of msg.choices || []) {
          if (c.delta && c.delta.content) text += c.delta.content;
          if (c.finish_reason) out.finish = c.finish_reason;
        }
      }
    }
    if (text) onText(text);
  }
}
