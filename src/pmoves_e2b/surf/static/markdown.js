// A small Markdown renderer for scraped pages (what markdownify writes): headings, paragraphs, lists,
// quotes, code, pipe tables, emphasis, code spans and links. It builds DOM nodes only (never HTML
// strings), so page content cannot inject markup; images become links (no remote loads, see the CSP).

const SAFE_URL = /^(https?:|mailto:|#|\/)/i;
const INLINE = /(\*\*|__)(.+?)\1|(\*|_)([^*_\s][^*_]*?)\3|`([^`]+)`|!\[([^\]]*)\]\(([^)\s]+)[^)]*\)|\[([^\]]+)\]\(([^)\s]+)[^)]*\)/g;

function inline(text) {
  const out = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) out.push(document.createTextNode(text.slice(last, match.index)));
    last = match.index + match[0].length;
    if (match[2] !== undefined) out.push(wrap("strong", inline(match[2])));
    else if (match[4] !== undefined) out.push(wrap("em", inline(match[4])));
    else if (match[5] !== undefined) out.push(wrap("code", [document.createTextNode(match[5])]));
    else if (match[7] !== undefined) out.push(link(match[7], [document.createTextNode(`🖼 ${match[6] || "image"}`)]));
    else out.push(link(match[9], inline(match[8])));
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

function wrap(tag, children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

function link(url, children) {
  if (!SAFE_URL.test(url)) return wrap("span", children);
  const node = wrap("a", children);
  node.href = url;
  node.target = "_blank";
  node.rel = "noopener noreferrer";
  return node;
}

const cells = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());

export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const fence = /^\s*(```|~~~)/.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      fragment.append(wrap("pre", [wrap("code", [document.createTextNode(body.join("\n"))])]));
      continue;
    }
    const heading = /^(#{1,6})\s+(.*?)\s*#*$/.exec(line);
    if (heading) {
      fragment.append(wrap(`h${heading[1].length}`, inline(heading[2])));
      i += 1;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      fragment.append(document.createElement("hr"));
      i += 1;
      continue;
    }
    if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-{2,}/.test(lines[i + 1])) {
      const table = document.createElement("table");
      table.className = "data";
      table.append(wrap("thead", [wrap("tr", cells(line).map((c) => wrap("th", inline(c))))]));
      const body = document.createElement("tbody");
      i += 2;
      while (i < lines.length && lines[i].trim().startsWith("|")) {
        body.append(wrap("tr", cells(lines[i++]).map((c) => wrap("td", inline(c)))));
      }
      table.append(body);
      fragment.append(table);
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      fragment.append(wrap("blockquote", [renderMarkdown(quoted.join("\n"))]));
      continue;
    }
    const item = /^\s*([-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && (item.test(lines[i]) || (/^\s{2,}\S/.test(lines[i]) && list.lastChild))) {
        if (item.test(lines[i])) list.append(wrap("li", inline(lines[i].replace(item, ""))));
        else list.lastChild.append(" ", ...inline(lines[i].trim()));
        i += 1;
      }
      fragment.append(list);
      continue;
    }
    const paragraph = [];
    while (i < lines.length && lines[i].trim() && !/^(#{1,6}\s|\s*```|\s*>|\s*([-*+]|\d+[.)])\s)/.test(lines[i])) {
      paragraph.push(lines[i++].trim());
    }
    if (!paragraph.length) paragraph.push(lines[i++].trim());
    fragment.append(wrap("p", inline(paragraph.join(" "))));
  }
  return fragment;
}
