// edgellm's chat page: conversations in the sidebar, streamed answers, stop, per-conversation settings,
// the model/device info panel and the API-key prompt. Plain ES modules, no build step.

import * as api from './api.js';
import * as chats from './chats.js';
import { h, messageNode, renderChatList, renderInfo, renderMessages, updateAnswer } from './view.js';

const $ = (id) => document.getElementById(id);
const ui = {
  app: $('app'), list: $('chat-list'), messages: $('messages'), input: $('input'), composer: $('composer'),
  send: $('send'), stop: $('stop'), title: $('chat-title'), model: $('model'), notice: $('notice'),
  status: $('status'), settings: $('settings'), info: $('info'), infoBody: $('info-body'), scrim: $('scrim'),
  keyDialog: $('key-dialog'), keyForm: $('key-form'), keyInput: $('key-input'), keyMsg: $('key-msg'),
  forgetKey: $('forget-key'), importFile: $('import-file'),
};
const SETTINGS = ['temperature', 'top_p', 'max_tokens', 'seed'];

let store = chats.load();
let info = null;
let live = null; // the answer streaming now: {chatId, msg, node, ctl, id, stopping, timer, t0, first}
let keyPrompt = null;

function current() {
  return chats.find(store, store.current) || chats.create(store);
}

function persist() {
  try {
    chats.save(store);
  } catch (e) {
    notify(`Conversations could not be saved (${e.name}): the browser's storage is full. ` +
      'Export and delete some conversations.');
  }
}

function notify(text) {
  ui.notice.textContent = text || '';
  ui.notice.hidden = !text;
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function render() {
  const chat = current();
  ui.title.textContent = chat.title;
  document.title = `${chat.title} · edgellm`;
  renderChatList(ui.list, store, {
    busyId: live?.chatId, onSelect: select, onRename: rename, onExport: exportChat, onDelete: remove,
  });
  const nodes = renderMessages(ui.messages, chat, info?.model);
  if (live) live.node = live.chatId === chat.id ? nodes[chat.messages.indexOf(live.msg)] : null;
  renderSettings(chat);
  scrollToEnd();
}

function renderSettings(chat) {
  const s = chat.settings;
  $('set-system').value = s.system || '';
  const d = info?.defaults;
  const defaults = { ...(d?.sampler || {}), max_tokens: d?.max_tokens };
  for (const k of SETTINGS) {
    const input = $('set-' + k);
    input.value = s[k] ?? '';
    input.placeholder = defaults[k] ?? '';
  }
}

function readSettings() {
  const chat = current();
  chat.settings.system = $('set-system').value;
  for (const k of SETTINGS) {
    const input = $('set-' + k);
    const v = input.value.trim() === '' ? undefined : Number(input.value);
    if (v === undefined || (Number.isFinite(v) && input.checkValidity())) chat.settings[k] = v;
    input.classList.toggle('invalid', !input.checkValidity());
  }
  chat.settings = chats.cleanChat(chat).settings; // the same bounds as stored and imported data
  persist();
}

function select(id) {
  store.current = id;
  ui.app.classList.remove('show-sidebar');
  ui.scrim.hidden = true;
  persist();
  render();
  ui.input.focus();
}

function newChat() {
  const chat = current();
  if (chat.messages.length || live?.chatId === chat.id) chats.create(store);
  select(store.current);
}

function rename(id, title) {
  chats.rename(store, id, title);
  persist();
  render();
}

function remove(id) {
  if (live?.chatId === id) stop();
  chats.remove(store, id);
  persist();
  render();
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: 'application/json' }));
  const a = h('a', { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

function slug(s) {
  return s.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, '-').replace(/^-|-$/g, '').slice(0, 40) || 'chat';
}

function exportChat(id) {
  const chat = chats.find(store, id);
  if (chat) download(`edgellm-${slug(chat.title)}.json`, chats.exportJson([chat]));
}

async function importChats(file) {
  try {
    const got = chats.importJson(await file.text());
    store.chats.unshift(...got);
    if (got.length) store.current = got[0].id;
    persist();
    render();
    notify(`Imported ${got.length} conversation${got.length === 1 ? '' : 's'}.`);
  } catch (e) {
    notify(`Could not import ${file.name}: ${e.message}`);
  }
}

function requestBody(chat, pending) {
  const s = chat.settings;
  const messages = s.system ? [{ role: 'system', content: s.system }] : [];
  for (const m of chat.messages) {
    if (m !== pending && m.content && !m.error) messages.push({ role: m.role, content: m.content });
  }
  const body = { messages };
  for (const k of SETTINGS) if (s[k] !== undefined) body[k] = s[k];
  return body;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.stop.disabled = false;
  ui.status.textContent = busy ? 'answering … (Esc stops)' : '';
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || live) return;
  const chat = current();
  chat.messages.push({ role: 'user', content: text });
  const msg = { role: 'assistant', content: '', pending: true };
  chat.messages.push(msg);
  const t0 = performance.now();
  const l = { chatId: chat.id, msg, node: null, ctl: new AbortController(), id: null, stopping: false, first: null };
  live = l;
  // The request leaves first, and the page's own work while the server prefills is kept small (two nodes
  // appended, not the conversation re-rendered): on a small device it competes with the model for the CPU.
  // Callbacks run only after this function yields, so the answer's node exists by then.
  const answer = api.streamChat(requestBody(chat, msg), {
    signal: l.ctl.signal,
    onStart: (id) => {
      l.id = id;
    },
    onText: (piece) => {
      msg.content += piece;
      if (l.first === null) {
        showAnswer(l); // the first token at once
        l.first = performance.now() - t0;
      } else if (!l.frame) {
        l.frame = requestAnimationFrame(() => showAnswer(l)); // later ones at most once a frame
      }
    },
  });
  notify('');
  if (chat.title === 'New chat') {
    chat.title = text.trim().split('\n')[0].slice(0, 60);
    ui.title.textContent = chat.title;
    document.title = `${chat.title} · edgellm`;
  }
  chat.updated = Date.now();
  store.chats = [chat, ...store.chats.filter((c) => c !== chat)];
  ui.input.value = '';
  grow();
  if (!ui.messages.querySelector('article')) ui.messages.replaceChildren();
  l.node = messageNode(msg, info?.model);
  ui.messages.append(messageNode(chat.messages[chat.messages.length - 2], info?.model), l.node);
  scrollToEnd();
  renderChatList(ui.list, store, {
    busyId: chat.id, onSelect: select, onRename: rename, onExport: exportChat, onDelete: remove,
  });
  setBusy(true);
  persist();
  try {
    const res = await answer;
    msg.stats = { ...(res.stats || { finish_reason: res.finish }) };
  } catch (e) {
    if (e.name === 'AbortError') msg.stats = { finish_reason: 'cancelled' };
    else msg.error = e.message;
  } finally {
    clearTimeout(l.timer);
    cancelAnimationFrame(l.frame);
    if (msg.stats && l.first !== null) msg.stats.page_ttft_ms = Math.round(l.first * 10) / 10;
    delete msg.pending;
    live = null;
    chat.updated = Date.now();
    persist();
    if (l.node) updateAnswer(l.node, msg);
    setBusy(false);
    renderChatList(ui.list, store, {
      onSelect: select, onRename: rename, onExport: exportChat, onDelete: remove,
    });
    refreshInfo();
  }
}

function showAnswer(l) {
  l.frame = 0;
  if (!l.node) return; // another conversation is on screen
  const follow = nearBottom();
  updateAnswer(l.node, l.msg);
  if (follow) scrollToEnd();
}

/** Stop the answer: ask the server to cancel it (the engine drops it at its next step, frees the slot and ends
 * the stream with its stats). Without an id yet, or when the request to cancel fails, drop the connection,
 * which cancels it as well; and drop it anyway if the stream has not ended 15 s later (a wedged proxy). */
function stop() {
  const l = live;
  if (!l || l.stopping) return;
  l.stopping = true;
  ui.stop.disabled = true;
  ui.status.textContent = 'stopping …';
  const drop = () => l.ctl.abort();
  if (!l.id) return drop();
  api.cancel(l.id).then((ok) => ok || drop(), drop);
  l.timer = setTimeout(drop, 15000);
}

async function refreshInfo() {
  try {
    info = await api.info();
    ui.model.textContent = `${info.model} · ${info.backend} on ${info.device}`;
    renderInfo(ui.infoBody, info);
    if (!live) renderSettings(current());
  } catch (e) {
    notify(e.message);
  }
}

/** The API-key dialog; concurrent 401s share one prompt. Resolves true when a key was entered. */
function askKey(refused) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const d = ui.keyDialog;
    ui.keyMsg.textContent = refused
      ? 'The server refused that key. Enter its API key (--api-key or EDGELLM_API_KEY).'
      : 'This server needs an API key (its --api-key or EDGELLM_API_KEY). It is kept in this browser.';
    ui.keyInput.value = '';
    const finish = (ok) => {
      ui.keyForm.removeEventListener('submit', onSubmit);
      $('key-cancel').removeEventListener('click', onCancel);
      d.removeEventListener('cancel', onCancel);
      if (d.open) d.close();
      keyPrompt = null;
      resolve(ok);
    };
    const onSubmit = (ev) => {
      ev.preventDefault();
      const key = ui.keyInput.value.trim();
      if (!key) return;
      api.setApiKey(key);
      ui.forgetKey.hidden = false;
      finish(true);
    };
    const onCancel = (ev) => {
      ev.preventDefault();
      finish(false);
    };
    ui.keyForm.addEventListener('submit', onSubmit);
    $('key-cancel').addEventListener('click', onCancel);
    d.addEventListener('cancel', onCancel);
    d.showModal();
    ui.keyInput.focus();
  });
  return keyPrompt;
}

function grow() {
  const t = ui.input;
  t.style.height = 'auto';
  t.style.height = Math.min(t.scrollHeight + 2, window.innerHeight * 0.4) + 'px';
}

function togglePanel(panel, button) {
  const open = panel.hidden;
  for (const [p, b] of [[ui.settings, 'settings-toggle'], [ui.info, 'info-toggle']]) {
    p.hidden = true;
    $(b).setAttribute('aria-expanded', 'false');
  }
  panel.hidden = !open;
  button.setAttribute('aria-expanded', String(open));
  if (open && panel === ui.info) refreshInfo();
}

function bind() {
  ui.composer.addEventListener('submit', (ev) => {
    ev.preventDefault();
    send();
  });
  ui.input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  ui.input.addEventListener('input', grow);
  ui.stop.addEventListener('click', stop);
  document.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Escape' || ui.keyDialog.open) return;
    if (live) stop();
    else if (ui.app.classList.contains('show-sidebar')) select(store.current);
    else for (const p of [ui.settings, ui.info]) if (!p.hidden) togglePanel(p, $(p.id + '-toggle'));
  });
  $('new-chat').addEventListener('click', newChat);
  $('menu').addEventListener('click', () => {
    ui.app.classList.toggle('show-sidebar');
    ui.scrim.hidden = !ui.app.classList.contains('show-sidebar');
  });
  ui.scrim.addEventListener('click', () => select(store.current));
  $('settings-toggle').addEventListener('click', (ev) => togglePanel(ui.settings, ev.currentTarget));
  $('info-toggle').addEventListener('click', (ev) => togglePanel(ui.info, ev.currentTarget));
  $('info-refresh').addEventListener('click', refreshInfo);
  for (const p of [ui.settings, ui.info]) {
    p.querySelector('.close').addEventListener('click', () => togglePanel(p, $(p.id + '-toggle')));
  }
  ui.settings.addEventListener('input', readSettings);
  $('export-all').addEventListener('click', () => download('edgellm-chats.json', chats.exportJson(store.chats)));
  $('import').addEventListener('click', () => ui.importFile.click());
  ui.importFile.addEventListener('change', () => {
    if (ui.importFile.files[0]) importChats(ui.importFile.files[0]);
    ui.importFile.value = '';
  });
  ui.forgetKey.addEventListener('click', () => {
    api.setApiKey('');
    ui.forgetKey.hidden = true;
    notify('API key forgotten; the page asks again at its next request.');
  });
  window.addEventListener('storage', (ev) => {
    if (ev.key === null || ev.key.startsWith('edgellm.chats')) {
      if (!live) {
        store = chats.load();
        render();
      }
    }
  });
}

async function start() {
  api.setKeyPrompt(askKey);
  bind();
  if (!store.chats.length) chats.create(store);
  render();
  ui.input.focus();
  try {
    const health = await api.health();
    ui.forgetKey.hidden = !(health.api_key_required && api.apiKey());
    if (health.api_key_required && !api.apiKey()) await askKey(false);
  } catch (e) {
    notify(e.message);
  }
  await refreshInfo();
  document.body.dataset.ready = '1'; // for tests and scripts: the page has its info
}

start();
