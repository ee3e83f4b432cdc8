// Markdown to DOM, written for edgellm (no vendored library): message text only ever becomes text nodes
// (textContent / append(string)); elements are created by name from this file's own constants, never
// parsed from the input, and no attribute takes a value from the text except a link's href, which must be
// an absolute http(s) or mailto URL. Raw HTML in a message shows as text. Images are shown as links (the
// page never loads anything it did not ship). The page's Trusted Types policy makes any HTML-string sink
// throw, so a mistake here fails loudly instead of injecting.
//
// Covered: paragraphs, line breaks, # headings, ``` fenced code, > quotes, - and 1. lists (nested by
// indentation), | tables |, ---, `code`, **strong**, *em*, _em_, ~~del~~, [links](https://...), bare URLs,
// backslash escapes. Every scan is linear (a marker with no closing partner is remembered, not searched
// again), so hostile text cannot make rendering quadratic.

const MAX_DEPTH = 8;
const PUNCT = '\\`*_{}[]()#+-.!|>~<&"\'';
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_URL = /^(https?:\/\/[^\s<>"]+|mailto:[^\s<>"]+)$/i;

function el(tag, cls) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  return e;
}

export function safeUrl(url) {
  if (!SAFE_URL.test(url)) return null;
  try {
    const u = new URL(url);
    return ['http:', 'https:', 'mailto:'].includes(u.protocol) ? u.href : null;
  } catch {
    return null;
  }
}

/** Render `text` as markdown into `parent` (its children are replaced). */
export function renderMarkdown(text, parent) {
  parent.replaceChildren();
  blocks(String(text).replace(/\r\n?/g, '\n').split('\n'), parent, 0);
  return parent;
}

function blocks(lines, parent, depth) {
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) {
      const p = el('p');
      inline(para.join('\n'), p, depth);
      parent.append(p);
      para = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flush();
      i++;
    } else if ((m = FENCE.exec(line))) {
      flush();
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
      i++; // the closing fence (absent while an answer is still streaming)
      parent.append(codeBlock(body.join('\n'), m[2]));
    } else if ((m = HEADING.exec(line))) {
      flush();
      const hd = el('h' + Math.min(m[1].length + 2, 6)); // a message's # is a section, not the page title
      inline(m[2], hd, depth);
      parent.append(hd);
      i++;
    } else if (RULE.test(line)) {
      flush();
      parent.append(el('hr'));
      i++;
    } else if (QUOTE.test(line) && depth < MAX_DEPTH) {
      flush();
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        inner.push(m[1]);
        i++;
      }
      const q = el('blockquote');
      blocks(inner, q, depth + 1);
      parent.append(q);
    } else if (ITEM.test(line) && depth < MAX_DEPTH) {
      flush();
      i = list(lines, i, parent, depth);
    } else if (line.includes('|') && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
               lines[i + 1].includes('-')) {
      flush();
      i = table(lines, i, parent, depth);
    } else {
      para.push(line);
      i++;
    }
  }
  flush();
}

function codeBlock(text, lang) {
  const pre = el('pre');
  const code = el('code');
  code.textContent = text;
  if (lang) pre.dataset.lang = lang.slice(0, 32);
  pre.append(code);
  return pre;
}

function list(lines, i, parent, depth) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const out = el(ordered ? 'ol' : 'ul');
  if (ordered) {
    const start = parseInt(first[2], 10);
    if (start !== 1) out.start = start;
  }
  const items = []; // [li, its lines]
  let item = null;
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && m[1].length <= indent + 1) {
      if (/\d/.test(m[2]) !== ordered) break;
      item = [m[3]];
      items.push([el('li'), item]);
      i++;
    } else if (line.trim() && item && (/^\s/.test(line) || !isBlockStart(line))) {
      item.push(line.slice(Math.min(indent + 2, line.length - line.trimStart().length)));
      i++;
    } else if (!line.trim() && i + 1 < lines.length && /^\s+\S/.test(lines[i + 1]) && item) {
      item.push('');
      i++;
    } else {
      break;
    }
  }
  for (const [li, inner] of items) {
    if (inner.length === 1) inline(inner[0], li, depth + 1);
    else blocks(inner, li, depth + 1);
    out.append(li);
  }
  parent.append(out);
  return i;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function cells(line) {
  const out = [];
  let cur = '';
  for (let k = 0; k < line.length; k++) {
    if (line[k] === '\\' && line[k + 1] === '|') {
      cur += '|';
      k++;
    } else if (line[k] === '|') {
      out.push(cur);
      cur = '';
    } else {
      cur += line[k];
    }
  }
  out.push(cur);
  if (line.trim().startsWith('|')) out.shift();
  if (line.trim().endsWith('|') && !line.trim().endsWith('\\|')) out.pop();
  return out.map((c) => c.trim());
}

function table(lines, i, parent, depth) {
  const head = cells(lines[i]).slice(0, 64);
  const t = el('table');
  const thead = el('thead');
  const tr = el('tr');
  for (const c of head) {
    const th = el('th');
    inline(c, th, depth + 1);
    tr.append(th);
  }
  thead.append(tr);
  t.append(thead);
  const tbody = el('tbody');
  i += 2;
  while (i < lines.length && lines[i].includes('|') && lines[i].trim()) {
    const row = el('tr');
    const cs = cells(lines[i]);
    for (let k = 0; k < head.length; k++) {
      const td = el('td');
      inline(cs[k] || '', td, depth + 1);
      row.append(td);
    }
    tbody.append(row);
    i++;
  }
  t.append(tbody);
  const wrap = el('div', 'table-wrap');
  wrap.append(t);
  parent.append(wrap);
  return i;
}

const EMPHASIS = { '**': 'strong', __: 'strong', '*': 'em', _: 'em', '~~': 'del' };

/** Inline markdown of `text` appended to `parent` as text nodes and a few known elements. */
export function inline(text, parent, depth = 0) {
  const missing = new Set(); // closing markers known to be absent further on
  let buf = '';
  const flush = () => {
    if (buf) parent.append(buf);
    buf = '';
  };
  const find = (needle, from, ok) => {
    if (missing.has(needle)) return -1;
    for (let j = text.indexOf(needle, from); j >= 0; j = text.indexOf(needle, j + 1)) {
      if (!ok || ok(j)) return j;
    }
    missing.add(needle);
    return -1;
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === '\\' && i + 1 < text.length && PUNCT.includes(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
    } else if (c === '\n') {
      flush();
      parent.append(el('br'));
      i++;
    } else if (c === '`') {
      let n = 1;
      while (text[i + n] === '`') n++;
      const tick = '`'.repeat(n);
      const j = find(tick, i + n, (k) => text[k + n] !== '`' && text[k - 1] !== '`');
      if (j >= 0) {
        flush();
        const code = el('code');
        code.textContent = text.slice(i + n, j);
        parent.append(code);
        i = j + n;
      } else {
        buf += tick;
        i += n;
      }
    } else if ((c === '*' || c === '_' || c === '~') && depth < MAX_DEPTH) {
      const mark = text[i + 1] === c ? c + c : c;
      const start = i + mark.length;
      const word = /[\p{L}\p{N}]/u;
      const opens = c !== '~' || mark.length === 2;
      const flanking = text[start] !== undefined && !/\s/.test(text[start]) && !(c === '_' && i > 0 &&
        word.test(text[i - 1]));
      const j = opens && flanking ? find(mark, start + 1, (k) => !/\s/.test(text[k - 1]) &&
        text[k + mark.length] !== c && text[k - 1] !== c &&
        !(c === '_' && k + mark.length < text.length && word.test(text[k + mark.length]))) : -1;
      if (j > start) {
        flush();
        const node = el(EMPHASIS[mark]);
        inline(text.slice(start, j), node, depth + 1);
        parent.append(node);
        i = j + mark.length;
      } else {
        buf += mark;
        i += mark.length;
      }
    } else if (c === '[' && depth < MAX_DEPTH) {
      const close = find(']', i + 1);
      const paren = close >= 0 && text[close + 1] === '(' ? find(')', close + 2) : -1;
      if (paren < 0) {
        buf += c;
        i++;
        continue;
      }
      const label = text.slice(i + 1, close);
      const target = text.slice(close + 2, paren).trim().split(/\s+/)[0] || '';
      const href = safeUrl(target);
      if (href) {
        flush();
        parent.append(link(href, label, depth));
      } else {
        buf += text.slice(i, paren + 1); // not a safe link: the whole thing shows as typed
      }
      i = paren + 1;
    } else if (c === 'h' && (text.startsWith('http://', i) || text.startsWith('https://', i)) &&
               (i === 0 || !/[\p{L}\p{N}]/u.test(text[i - 1]))) {
      let j = i;
      while (j < text.length && !/[\s<>"]/.test(text[j])) j++;
      while (j > i && '.,:;!?)\'*_'.includes(text[j - 1])) j--;
      const href = safeUrl(text.slice(i, j));
      if (href) {
        flush();
        parent.append(link(href, text.slice(i, j), MAX_DEPTH));
      } else {
        buf += text.slice(i, j);
      }
      i = Math.max(j, i + 1);
    } else {
      buf += c;
      i++;
    }
  }
  flush();
  return parent;
}

function link(href, label, depth) {
  const a = el('a');
  a.href = href;
  a.rel = 'noopener noreferrer nofollow';
  a.target = '_blank';
  if (depth >= MAX_DEPTH) a.textContent = label;
  else inline(label, a, depth + 1);
  return a;
}
