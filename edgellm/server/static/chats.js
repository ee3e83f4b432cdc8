// Conversations, kept in the browser's localStorage (nothing about them is stored on the server):
// create, rename, delete, export as JSON and import. Stored and imported data goes through `clean`, so a
// hand-edited or hostile file can only ever yield well-formed conversations of plain strings and numbers.

const KEY = 'edgellm.chats.v1';
const ROLES = new Set(['user', 'assistant']);
const SETTINGS = { temperature: [0, 2], top_p: [0, 1], max_tokens: [1, 1 << 20], seed: [0, 2 ** 32 - 1] };
export const FORMAT = 'edgellm-chats';

function newId() {
  // crypto.randomUUID needs a secure context; a LAN address over http is not one
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

function str(v, max = 1 << 22) {
  return typeof v === 'string' ? v.slice(0, max) : '';
}

function num(v, [lo, hi]) {
  return typeof v === 'number' && Number.isFinite(v) && v >= lo && v <= hi ? v : undefined;
}

function cleanStats(s) {
  if (!s || typeof s !== 'object') return undefined;
  const out = {};
  for (const [k, v] of Object.entries(s)) {
    if (/^[a-z_]{1,32}$/.test(k) && (typeof v === 'number' || typeof v === 'string' || v === null)) {
      out[k] = typeof v === 'string' ? v.slice(0, 64) : v;
    }
  }
  return out;
}

export function cleanChat(c) {
  if (!c || typeof c !== 'object') return null;
  const settings = { system: str(c.settings?.system, 1 << 16) };
  for (const [k, range] of Object.entries(SETTINGS)) {
    const v = num(c.settings?.[k], range);
    if (v !== undefined) settings[k] = k === 'max_tokens' || k === 'seed' ? Math.round(v) : v;
  }
  const messages = (Array.isArray(c.messages) ? c.messages : [])
    .filter((m) => m && ROLES.has(m.role) && typeof m.content === 'string')
    .map((m) => {
      const out = { role: m.role, content: str(m.content) };
      if (m.role === 'assistant') {
        const stats = cleanStats(m.stats);
        if (stats) out.stats = stats;
        if (typeof m.error === 'string') out.error = m.error.slice(0, 500);
      }
      return out;
    });
  return {
    id: typeof c.id === 'string' && /^[\w-]{1,40}$/.test(c.id) ? c.id : newId(),
    title: str(c.title, 200) || 'New chat',
    created: num(c.created, [0, 1e14]) ?? Date.now(),
    updated: num(c.updated, [0, 1e14]) ?? Date.now(),
    settings,
    messages,
  };
}

function clean(data) {
  const chats = (Array.isArray(data?.chats) ? data.chats : []).map(cleanChat).filter(Boolean);
  const ids = new Set();
  const unique = chats.filter((c) => !ids.has(c.id) && ids.add(c.id));
  const current = unique.some((c) => c.id === data?.current) ? data.current : unique[0]?.id ?? null;
  return { chats: unique, current };
}

export function load() {
  try {
    return clean(JSON.parse(localStorage.getItem(KEY) || '{}'));
  } catch {
    return { chats: [], current: null };
  }
}

/** Throws (QuotaExceededError) when the browser's storage is full: the caller tells the user. */
export function save(store) {
  localStorage.setItem(KEY, JSON.stringify({ format: FORMAT, version: 1, ...store }));
}

export function create(store) {
  const chat = cleanChat({ id: newId(), title: 'New chat', messages: [], settings: {} });
  store.chats.unshift(chat);
  store.current = chat.id;
  return chat;
}

export function find(store, id) {
  return store.chats.find((c) => c.id === id) || null;
}

export function remove(store, id) {
  store.chats = store.chats.filter((c) => c.id !== id);
  if (store.current === id) store.current = store.chats[0]?.id ?? null;
}

export function rename(store, id, title) {
  const chat = find(store, id);
  if (chat && title.trim()) chat.title = title.trim().slice(0, 200);
}

/** The JSON a user downloads: one conversation or all of them. */
export function exportJson(chats) {
  return JSON.stringify({ format: FORMAT, version: 1, exported: new Date().toISOString(), chats }, null, 2);
}

/** Conversations from an exported file, with fresh ids (an import never overwrites). Throws on non-JSON. */
export function importJson(text) {
  const data = JSON.parse(text);
  if (data?.format !== FORMAT) throw new Error('not an edgellm chat export');
  return clean(data).chats.map((c) => ({ ...c, id: newId() }));
}
