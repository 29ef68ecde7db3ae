"""The house's import graph, read from the code itself: the folder rules it must keep, its circles, and a picture.

    python scripts/import_graph.py --check            # the rules and circles; exit 1 on a broken rule
    python scripts/import_graph.py --svg docs/imports.svg

Rules (docs/ARCHITECTURE.md, "What each folder may import"): `tpv/` imports neither Ray nor `serve`/`tune_jobs`;
`serve/` does not import `tune_jobs/` (the main job's serve stage imports `serve`, not the reverse). A circle is two or more modules that reach each other, counting
imports inside functions too (a deferred import hides a circle from Python, not from a reader).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tpv", "tune_jobs", "serve")
#: folder -> top-level names it must never import
FORBIDDEN = {"tpv": ("ray", "serve", "tune_jobs"), "serve": ("tune_jobs",), "tune_jobs": ()}
COLOURS = {"tpv": "#dbeafe", "tune_jobs": "#dcfce7", "serve": "#fde68a"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every first-party module name -> its file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imported_names(path: Path, top_level_only: bool) -> set[str]:
    """Absolute module names `path` imports (`from a import b` gives both `a` and `a.b`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def graph(top_level_only: bool = False, root: Path = ROOT) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports."""
    mods = modules(root)
    return {m: {n for n in imported_names(p, top_level_only) if n in mods and n != m} for m, p in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def broken_rules(root: Path = ROOT) -> list[str]:
    """'module imports name' for every import a folder rule forbids."""
    out = []
    for module, path in modules(root).items():
        banned = FORBIDDEN[module.split(".")[0]]
        for name in sorted(imported_names(path, top_level_only=False)):
            if name.split(".")[0] in banned:
                out.append(f"{module} imports {name}")
    return sorted(set(out))


def layers(g: dict[str, set[str]]) -> dict[str, int]:
    """Each module's depth: 0 imports nothing first-party, else one more than the deepest module it imports
    (top-level imports, which have no circles: `--check` says so)."""
    depth: dict[str, int] = {}

    def of(m: str, seen: frozenset[str] = frozenset()) -> int:
        if m not in depth:
            deps = [d for d in g[m] if d not in seen]
            depth[m] = 1 + max((of(d, seen | {m}) for d in deps), default=-1)
        return depth[m]

    for m in g:
        of(m)
    return depth


def svg(g: dict[str, set[str]]) -> str:
    """Modules as boxes in columns by depth (the data path runs left to right), coloured by folder, an arrow per
    import. Made from the code, so the picture cannot drift from it."""
    depth = layers(g)
    columns: dict[int, list[str]] = {}
    for m in sorted(g, key=lambda m: (m.split(".")[0] != "tpv", m)):
        columns.setdefault(depth[m], []).append(m)
    box_w, box_h, gap_x, gap_y, pad = 170, 22, 60, 8, 20
    pos = {m: (pad + c * (box_w + gap_x), pad + 30 + r * (box_h + gap_y))
           for c, ms in columns.items() for r, m in enumerate(ms)}
    width = pad * 2 + len(columns) * (box_w + gap_x)
    height = pad * 2 + 30 + max(len(ms) for ms in columns.values()) * (box_h + gap_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">',
             '<defs><marker id="a" markerWidth="6" markerHeight="6" refX="6" refY="3" orient="auto">'
             '<path d="M0,0 L6,3 L0,6 z" fill="#94a3b8"/></marker></defs>',
             f'<text x="{pad}" y="{pad + 10}" font-size="13">tpv imports, left = depends on nothing; an arrow points '
             'from a module to what it imports. Blue tpv/, green tune_jobs/, yellow serve/.</text>']
    for m, deps in sorted(g.items()):
        x1, y1 = pos[m]
        for d in sorted(deps):
            x2, y2 = pos[d]
            parts.append(f'<line x1="{x1}" y1="{y1 + box_h / 2}" x2="{x2 + box_w}" y2="{y2 + box_h / 2}" '
                         'stroke="#cbd5e1" stroke-width="0.6" marker-end="url(#a)"/>')
    for m, (x, y) in pos.items():
        parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" '
                     f'fill="{COLOURS[m.split(".")[0]]}" stroke="#64748b"/>'
                     f'<text x="{x + 6}" y="{y + 15}">{m}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="print broken folder rules and import circles")
    p.add_argument("--svg", help="write the picture here")
    args = p.parse_args(argv)
    if args.svg:
        Path(args.svg).write_text(svg(graph(top_level_only=True)))
    if args.check:
        broken = broken_rules()
        for line in broken:
            print(f"rule broken: {line}")
        for kind, top in (("top-level", True), ("any (deferred imports too)", False)):
            found = circles(graph(top_level_only=top))
            print(f"circles, {kind}: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
        return 1 if broken else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
