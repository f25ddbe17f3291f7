"""The values table of deploy/README.md, generated from the `# --` comments of values.yaml.

A key is documented by the `# -- text` comment block right above it (continuation lines start
with `#` too). A map whose children carry their own comments is a section and is expanded;
any other value (scalar, list, or a map documented as a whole) is one row. Every value must be
covered by a comment: an undocumented one is an error, so the table cannot silently rot.

    python3 deploy/ci/values_doc.py helm/dimple/values.yaml   # print the table
"""

import json
import re
import sys

import yaml

KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(\s|$)")


def comments_by_path(text):
    """Map each documented key path (a tuple) to its `# --` comment text."""
    docs = {}
    stack = []  # (indent, key) of the enclosing mapping keys
    pending = None  # comment lines waiting for the next key
    list_indent = None  # inside a block list item: skip its lines
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None and stripped != "#":
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            pending = None
            continue
        if list_indent is not None:
            if indent > list_indent or (indent == list_indent and stripped.startswith("- ")):
                continue
            list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            continue
        m = KEY_RE.match(line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group("key")))
        if pending is not None:
            docs[tuple(k for _, k in stack)] = " ".join(pending)
            pending = None
    return docs


def rows(values, docs, path=()):
    """Yield (path, default, description); raise ValueError for an undocumented value."""
    for key, value in values.items():
        p = path + (key,)
        has_documented_children = any(d[: len(p)] == p and len(d) > len(p) for d in docs)
        if isinstance(value, dict) and value and has_documented_children:
            yield from rows(value, docs, p)
        elif p in docs:
            yield p, value, docs[p]
        else:
            raise ValueError(f"values.yaml key `{'.'.join(p)}` has no `# --` comment")


def render_default(value):
    text = json.dumps(value, separators=(", ", ": "))
    return "`" + text.replace("|", "\\|") + "`"


def table(values_path):
    with open(values_path, encoding="utf-8") as f:
        text = f.read()
    values = yaml.safe_load(text)
    docs = comments_by_path(text)
    out = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for p, value, desc in rows(values, docs):
        cells = ("`" + ".".join(p) + "`", render_default(value), desc.replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(sys.argv[1] if len(sys.argv) > 1 else "helm/dimple/values.yaml"))
