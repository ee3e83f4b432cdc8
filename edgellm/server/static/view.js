// Building the page's DOM. `h` creates elements by name and adds children with append(), which turns
// strings into text nodes: nothing here parses HTML. Event handlers are functions, never strings.

import { renderMarkdown } from './markdown.js';

export function h(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

const fmt = (x, digits = 0) => (typeof x === 'number' ? x.toFixed(digits) : '–');
const mib = (b) => (typeof b === 'number' ? (b / 1048576).toFixed(b < 10485760 ? 1 : 0) + ' MiB' : '–');

/** One line of figures under an answer: the server's clock, and the page's own first-token time. */
export function statsText(m) {
  const s = m.stats || {};
  const parts = [];
  if (typeof s.ttft_ms === 'number') parts.push(`TTFT ${fmt(s.ttft_ms)} ms`);
  if (typeof s.decode_tps === 'number') parts.push(`${fmt(s.decode_tps, 1)} tok/s`);
  if (typeof s.completion_tokens === 'number') parts.push(`${s.completion_tokens} tokens`);
  if (typeof s.reused_tokens === 'number' && typeof s.prompt_tokens === 'number') {
    const src = s.reused_tokens && s.cache_source ? ` (${s.cache_source})` : '';
    parts.push(`${s.reused_tokens}/${s.prompt_tokens} prompt tokens reused from the KV cache${src}`);
  }
  if (typeof s.page_ttft_ms === 'number') parts.push(`first token shown after ${fmt(s.page_ttft_ms)} ms`);
  if (s.finish_reason === 'cancelled') parts.push('stopped');
  else if (s.finish_reason === 'length') parts.push('cut at max tokens');
  else if (s.finish_reason === 'timeout') parts.push('timed out');
  return parts.join(' · ');
}

export function messageNode(m, model) {
  const user = m.role === 'user';
  const body = h('div', { class: user ? 'body plain' : 'body md' });
  if (user) body.textContent = m.content;
  const node = h('article', { class: `msg ${m.role}`, dataset: { role: m.role } },
    h('div', { class: 'who', text: user ? 'You' : model || 'assistant' }), body,
    user ? null : h('div', { class: 'meta' }));
  if (!user) updateAnswer(node, m);
  return node;
}

/** Re-render an answer (called for every network read while it streams). */
export function updateAnswer(node, m) {
  const body = node.querySelector('.body');
  renderMarkdown(m.content, body);
  node.dataset.state = m.pending ? 'streaming' : m.error ? 'error' : m.stats?.finish_reason || 'done';
  const meta = node.querySelector('.meta');
  if (m.error) meta.replaceChildren(h('span', { class: 'error', text: m.error }));
  else meta.textContent = m.pending ? (m.content ? '' : 'thinking …') : statsText(m);
}

export function renderMessages(container, chat, model) {
  if (!chat.messages.length) {
    container.replaceChildren(h('div', { class: 'empty' },
      h('p', { text: 'Ask anything. Answers are generated on this machine.' }),
      h('p', { class: 'muted', text: 'Enter sends · Shift+Enter adds a line · Esc stops an answer' })));
    return [];
  }
  const nodes = chat.messages.map((m) => messageNode(m, model));
  container.replaceChildren(...nodes);
  return nodes;
}

export function renderChatList(list, store, { busyId, onSelect, onRename, onExport, onDelete }) {
  const items = store.chats.map((c) => {
    const current = c.id === store.current;
    const del = h('button', { type: 'button', class: 'icon', title: 'Delete', 'aria-label': `Delete ${c.title}` }, '✕');
    del.addEventListener('click', (ev) => {
      ev.stopPropagation();
      if (del.dataset.armed) onDelete(c.id);
      else {
        del.dataset.armed = '1';
        del.textContent = 'Delete?';
        setTimeout(() => {
          delete del.dataset.armed;
          del.textContent = '✕';
        }, 3000);
      }
    });
    const title = h('button', { type: 'button', class: 'title', title: c.title, 'aria-current': current ? 'true' : null,
      onclick: () => onSelect(c.id) }, c.title);
    return h('li', { class: current ? 'current' : '', dataset: { id: c.id, busy: c.id === busyId ? '1' : null } },
      title,
      h('span', { class: 'actions' },
        h('button', { type: 'button', class: 'icon', title: 'Rename', 'aria-label': `Rename ${c.title}`,
          onclick: (ev) => { ev.stopPropagation(); startRename(title, c, onRename); } }, '✎'),
        h('button', { type: 'button', class: 'icon', title: 'Export as JSON', 'aria-label': `Export ${c.title}`,
          onclick: (ev) => { ev.stopPropagation(); onExport(c.id); } }, '⤓'),
        del));
  });
  list.replaceChildren(...items);
}

function startRename(titleButton, chat, onRename) {
  const input = h('input', { type: 'text', class: 'rename', value: chat.title, 'aria-label': 'New title' });
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    onRename(chat.id, keep ? input.value : chat.title);
  };
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter') finish(true);
    else if (ev.key === 'Escape') {
      ev.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener('blur', () => finish(true));
  titleButton.replaceWith(input);
  input.focus();
  input.select();
}

export function renderInfo(body, info) {
  const plan = info.plan || {};
  const dl = h('dl');
  const row = (k, v) => dl.append(h('dt', { text: k }), h('dd', {}, v));
  row('Model', `${info.model} (${info.file}, ${mib(info.file_bytes)})`);
  row('Backend', `${info.backend} on ${info.device}`);
  if (plan.threads) row('Threads', String(plan.threads));
  if (plan.simd) row('SIMD', plan.simd);
  if (plan.est_memory_bytes) row('Memory (estimate)', mib(plan.est_memory_bytes));
  row('Context', `${info.context_tokens} tokens per slot, ${info.mode} decoding`);
  row('Slots', h('ul', { class: 'slots' }, (info.slots || []).map((s) =>
    h('li', { text: `${s.slot}: ${s.busy ? 'answering' : 'idle'} · ${s.cached_tokens} tokens cached` }))));
  const kv = info.kv_cache || {};
  row('KV snapshots', `${kv.memory_states} in memory (${mib(kv.memory_bytes)} of ${mib(kv.memory_max_bytes)})`);
  if (info.system_prompt_tokens) row('System prompt', `${info.system_prompt_tokens} tokens, KV state pinned`);
  const d = info.defaults?.sampler;
  if (d) row('Defaults', `temperature ${d.temperature}, top-p ${d.top_p}, top-k ${d.top_k}, ` +
    `max tokens ${info.defaults.max_tokens}`);
  row('edgellm', info.version);
  const parts = [dl];
  if (plan.reasons?.length) parts.push(h('h3', { text: 'Why this backend' }), h('ul', { class: 'reasons' },
    plan.reasons.map((r) => h('li', { text: r }))));
  if (plan.warnings?.length) parts.push(h('h3', { text: 'Warnings' }), h('ul', { class: 'warnings' },
    plan.warnings.map((r) => h('li', { text: r }))));
  body.replaceChildren(...parts);
}
