"""The CUDA half of the ticket lint (bench/lint_tickets.py runs it; docs/gpu-verification.md,
"The ticket lint"): a parse of csrc/cuda/**, just enough C++ to find the device functions, the
tickets and their finishing paths.

Every global atomic whose result is used (a ticket) has a `__threadfence()` before it that
dominates it (same or enclosing block, not under a brace-less `if`), after a `__syncthreads()` when
only some threads fence; the ticket acquires (an acq_rel/acquire atomic, read from the PTX of its
wrapper, or a fence after it). Every finishing path - the body of `if (ticket(...))`, the rest of
the function after `if (!ticket(...)) return;`, and every device function called from there -
reads the memory blocks exchange (the workspace: what the host code carves with `Carver::data`,
and every member read with `__ldcg`) through `__ldcg`/`__ldcv`, a volatile access or an
`ld.global.cg`/`.acquire` asm, never a plain load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COHERENT_LOADS = ("__ldcg", "__ldcv")
COHERENT_ASM = ("ld.global.cg", "ld.cg", "ld.global.cv", "ld.volatile", "ld.acquire",
                "ld.global.acquire")
CACHED_LOADS = ("__ldg", "__ldca", "__ldcs", "__ldlu")  # may hit a stale L1 (or the read-only cache)
CUDA_ATOMICS = ("atomicAdd", "atomicSub", "atomicInc", "atomicDec", "atomicCAS", "atomicExch",
                "atomicMax", "atomicMin", "atomicAnd", "atomicOr", "atomicXor")
ACQUIRING = ("acq_rel", "acquire")
PATH = r"(?:\w+\s*(?:\.|->)\s*)*\w+"


# ---------------------------------------------------------------- C++ source, just enough of it

def _blank(m: re.Match) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def strip_source(text: str) -> str:
    """Comments and preprocessor lines blanked (newlines kept, so offsets keep their lines)."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", _blank, text, flags=re.S)
    return re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", _blank, text, flags=re.M)


def match_close(text: str, i: int) -> int:
    """Index of the bracket closing the one at text[i]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    opening, depth = text[i], 0
    for j in range(i, len(text)):
        if text[j] == opening:
            depth += 1
        elif text[j] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {opening!r} at offset {i}")


def split_args(text: str) -> list[str]:
    """Top-level comma-separated parts of an argument or parameter list."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:j])
            start = j + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Function:
    name: str
    file: "Source"
    params: list[str]
    open: int  # offset of the body's "{"
    close: int  # offset of its "}"
    kernel: bool
    returns_bool: bool
    calls: set = field(default_factory=set)


@dataclass
class Source:
    path: Path
    text: str  # stripped
    blocks: list  # (open, close) of every brace pair

    def line(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1

    def enclosing(self, offset: int) -> list:
        return [b for b in self.blocks if b[0] < offset < b[1]]


def parse_source(path: Path, rel: str) -> tuple[Source, list[Function]]:
    text = strip_source(path.read_text())
    blocks, stack = [], []
    for j, ch in enumerate(text):
        if ch == "{":
            stack.append(j)
        elif ch == "}" and stack:
            blocks.append((stack.pop(), j))
    src = Source(Path(rel), text, blocks)
    functions, seen = [], set()
    for m in re.finditer(r"\b__(?:device|global)__\b", text):
        depth, j = 0, m.end()
        while j < len(text) and not (depth == 0 and text[j] in "{;"):
            depth += text[j] == "("
            depth -= text[j] == ")"
            j += 1
        if j >= len(text) or text[j] != "{" or j in seen:
            continue
        seen.add(j)
        decl = text[m.start():j]
        close_paren = decl.rstrip().rfind(")")
        open_paren = close_paren
        depth = 0
        for k in range(close_paren, -1, -1):
            depth += decl[k] == ")"
            depth -= decl[k] == "("
            if depth == 0:
                open_paren = k
                break
        name = re.findall(r"(\w+)\s*$", decl[:open_paren])[0]
        params = [(re.findall(r"(\w+)\s*(?:\[[^\]]*\])?\s*(?:=.*)?$", p) or [""])[0]
                  for p in split_args(decl[open_paren + 1:close_paren])]
        start = text.rfind("\n", 0, m.start())
        functions.append(Function(name, src, params, j, match_close(text, j),
                                  "__global__" in text[start:j], re.search(r"\bbool\b",
                                  decl[:open_paren]) is not None))
    return src, functions


def cuda_sources(root: Path) -> list[Path]:
    return sorted(p for ext in ("cu", "cuh", "h") for p in (root / "csrc" / "cuda").rglob(f"*.{ext}"))


# ---------------------------------------------------------------- the native lint

@dataclass
class Finding:
    where: str  # file:line
    kernel: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kernel}: {self.what}"


class NativeLint:
    """The ticket rules over a set of CUDA sources (paths relative to ``root`` in findings)."""

    def __init__(self, paths: list[Path], root: Path = ROOT):
        self.sources, self.functions = [], []
        for p in paths:
            rel = os.path.relpath(p, root) if Path(p).is_absolute() else str(p)
            src, fns = parse_source(Path(p), rel)
            self.sources.append(src)
            self.functions += fns
        self.by_name: dict = {}
        for f in self.functions:
            self.by_name.setdefault(f.name, []).append(f)
        for f in self.functions:
            body = f.file.text[f.open:f.close]
            f.calls = {n for n in re.findall(r"\b(\w+)\s*(?:<[^;{}()]*>)?\s*\(", body)
                       if n in self.by_name and n != f.name}
        self.atomics = {name: "relaxed" for name in CUDA_ATOMICS}
        for f in self.functions:  # wrappers: a device function around an asm atom.*
            asm = re.search(r'"\s*(atom\.[\w.]*)', f.file.text[f.open:f.close])
            if asm:
                sem = next((s for s in ("acq_rel", "acquire", "release") if f".{s}" in asm.group(1)),
                           "relaxed")
                self.atomics[f.name] = sem
        self.cross = self._cross_block_names()
        self.findings: list[Finding] = []
        self.tickets: list = []  # (function, offset, atomic)
        self.sites: list = []  # (function, offset, helper)
        self.coherent_reads = 0
        self._loads: dict = {}  # (file:line, path) -> (kernels, ticket sites)

    # -- what the blocks exchange
    def _cross_block_names(self) -> set:
        names = set()
        for src in self.sources:
            t = src.text
            names |= set(re.findall(r"(?:\.|->)\s*(\w+)\s*=\s*\w+\s*\.\s*data\s*\(", t))
            for local in re.findall(r"\b(\w+)\s*=\s*\w+\s*\.\s*data\s*\(", t):
                names |= set(re.findall(rf"\*\s*(\w+)\s*=\s*{local}\b", t))
            for call in re.finditer(r"\b(?:__ldcg|__ldcv)\s*\(\s*&?\s*(" + PATH + ")", t):
                parts = re.split(r"\s*(?:\.|->)\s*", call.group(1))
                if len(parts) > 1:
                    names.add(parts[-1])
        return names

    def kernels_of(self, fn: Function) -> str:
        return ", ".join(sorted(self.kernel_set(fn))) or f"{fn.name} (no kernel calls it)"

    def kernel_set(self, fn: Function) -> set:
        """The __global__ functions that reach ``fn`` (its own name if it is one)."""
        found, todo, seen = set(), [fn.name], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for f in self.by_name.get(name, []):
                if f.kernel:
                    found.add(f.name)
            todo += [g.name for g in self.functions if name in g.calls]
        return found

    def _report(self, fn: Function, offset: int, what: str) -> None:
        self.findings.append(Finding(f"{fn.file.path}:{fn.file.line(offset)}", self.kernels_of(fn),
                                     what))

    def _plain_load(self, fn: Function, at: int, path: str, origin: tuple) -> None:
        where = f"{fn.file.path}:{fn.file.line(at)}"
        key = (where, path)
        if key not in self._loads:
            self._loads[key] = (set(), [])
        kernels, origins = self._loads[key]
        kernels.update(self.kernel_set(origin[0]) or {origin[0].name})
        if origin[1] not in origins:
            origins.append(origin[1])

    # -- fences
    def _statement_prefix(self, src: Source, offset: int) -> str:
        start = max(src.text.rfind(ch, 0, offset) for ch in ";{}")
        return src.text[start + 1:offset]

    def _dominates(self, src: Source, a: int, b: int) -> bool:
        """The statement at ``a`` runs whenever the one at ``b`` does (brace structure only)."""
        if a >= b or re.search(r"\b(?:if|else|for|while)\b", self._statement_prefix(src, a)):
            return False
        return set(src.enclosing(a)) <= set(src.enclosing(b))

    def _check_ticket(self, fn: Function, offset: int, atomic: str) -> None:
        src, body = fn.file, range(fn.open, fn.close)
        fences = [m.start() for m in re.finditer(r"\b__threadfence\s*\(", src.text)
                  if m.start() in body]
        before = [f for f in fences if self._dominates(src, f, offset)]
        if not before:
            self._report(fn, offset, f"ticket {atomic}() in {fn.name} has no __threadfence() "
                         "before it (the block's partials may not be visible to the last block)")
        else:
            fence = before[-1]
            barriers = [m.start() for m in re.finditer(r"\b__syncthreads\s*\(", src.text)
                        if m.start() in body and self._dominates(src, m.start(), fence)]
            everyone = set(src.enclosing(fence)) == {(fn.open, fn.close)}
            if not everyone and not barriers:
                self._report(fn, fence, f"the fence of the ticket in {fn.name} runs in some "
                             "threads only, with no __syncthreads() before it")
        if self.atomics[atomic] not in ACQUIRING and not any(f > offset for f in fences):
            self._report(fn, offset, f"ticket {atomic}() in {fn.name} is {self.atomics[atomic]} "
                         "and no __threadfence() follows it (the last block does not acquire)")

    def _find_tickets(self) -> None:
        for fn in self.functions:
            text = fn.file.text
            for m in re.finditer(r"\b(" + "|".join(map(re.escape, self.atomics)) + r")\s*\(",
                                 text[fn.open:fn.close]):
                at = fn.open + m.start()
                if fn.name in self.atomics:  # a wrapper's own atomic
                    continue
                prefix = self._statement_prefix(fn.file, at)
                prefix = re.sub(r"\b(?:if|while)\s*\(.*\)|\belse\b|\(void\)", "", prefix, flags=re.S)
                if prefix.strip():  # its result is used: a ticket (a reset discards it)
                    self.tickets.append((fn, at, m.group(1)))
                    self._check_ticket(fn, at, m.group(1))

    # -- finishing paths
    def _finishing_region(self, fn: Function, call: int, name: str) -> tuple[int, int] | None:
        """(start, end) of the code that runs in the last block, for a call of ticket helper
        ``name`` at ``call`` in ``fn``."""
        text = fn.file.text
        cond = None
        for m in re.finditer(r"\bif\s*\(", text[fn.open:call]):
            o = fn.open + m.end() - 1
            if match_close(text, o) > call:
                cond = o
        if cond is None:  # e.g. a bool kept for later: everything after it in the function
            return (match_close(text, text.index("(", call)), fn.close)
        end = match_close(text, cond)
        negated = re.fullmatch(r"\s*!\s*", text[cond + 1:call]) is not None
        if negated:
            after = re.match(r"\s*return\s*;", text[end + 1:])
            if not after:
                return None
            block = min((b for b in fn.file.enclosing(call)), key=lambda b: b[1] - b[0])
            return (end + 1 + after.end(), block[1])
        k = end + 1
        while text[k].isspace():
            k += 1
        if text[k] == "{":
            return (k, match_close(text, k))
        depth, j = 0, k
        while not (depth == 0 and text[j] == ";"):
            depth += text[j] in "([{"
            depth -= text[j] in ")]}"
            j += 1
        return (k, j)

    @staticmethod
    def _innermost_call(text: str, start: int, at: int):
        """(callee name, or "" for a bare parenthesis; offset of its "(") of the innermost
        parenthesis around ``at`` in its statement, or None."""
        stmt = max(max(text.rfind(ch, 0, at) for ch in ";{}"), start)
        inner = None
        for m in re.finditer(r"(\b\w+\s*)?\(", text[stmt:at]):
            o = stmt + m.end() - 1
            if match_close(text, o) > at:
                inner = ((m.group(1) or "").strip(), o)
        return inner

    def _coherent(self, text: str, start: int, at: int) -> bool:
        """The access at ``at`` is inside __ldcg/__ldcv(...), a volatile cast or a coherent asm."""
        stmt = max(text.rfind(ch, 0, at) for ch in ";{}")
        stmt = max(stmt, start)
        for m in re.finditer(r"\b(\w+)\s*\(", text[stmt:at]):
            o = stmt + m.end() - 1
            if match_close(text, o) > at:
                if m.group(1) in COHERENT_LOADS:
                    return True
                if m.group(1) == "asm" or m.group(1) == "volatile":
                    head = text[o:match_close(text, o)]
                    if any(s in head for s in COHERENT_ASM):
                        return True
        return re.search(r"\bvolatile\b", text[stmt:at]) is not None

    def _lint_region(self, fn: Function, start: int, end: int, bound: set, origin: tuple,
                     seen: set) -> None:
        key = (fn.name, fn.file.path, start, frozenset(bound), origin[1])
        if key in seen:
            return
        seen.add(key)
        text = fn.file.text
        local = set(bound)
        for m in re.finditer(r"\b(\w+)\s*=\s*([^;=][^;]*);", text[fn.open:fn.close]):
            if self._is_cross(m.group(2), local):
                local.add(m.group(1))
        for m in re.finditer(r"(?<![\w.>])" + PATH, text[start:end]):
            at = start + m.start()
            path = m.group(0)
            if not self._is_cross_path(path, local):
                continue
            after = start + m.end()
            rest = text[after:end].lstrip()
            before = text[start:at].rstrip()
            load, call = None, self._innermost_call(text, start, at)
            if rest.startswith("["):
                close = match_close(text, text.index("[", after))
                tail = text[close + 1:].lstrip()
                load = not (tail.startswith("=") and not tail.startswith("=="))
            elif before.endswith("*") and not re.search(r"[\w)\]]\s*\*$", before):
                load = not (rest.startswith("=") and not rest.startswith("=="))
            elif call and call[0] == "" and re.search(r"(?:^|[^\w)\]\s])\s*\*\s*$",
                                                       text[start:call[1]]):
                tail = text[match_close(text, call[1]) + 1:].lstrip()  # *(path + i)
                load = not (tail.startswith("=") and not tail.startswith("=="))
            elif call and call[0] in COHERENT_LOADS:
                self.coherent_reads += 1
            elif call and call[0] in CACHED_LOADS:
                load = True
            if load:
                if self._coherent(text, start, at):
                    self.coherent_reads += 1
                else:
                    self._plain_load(fn, at, path, origin)
        for m in re.finditer(r"\b(\w+)\s*(<[^;{}()]*>)?\s*\(", text[start:end]):
            callee = m.group(1)
            if callee not in self.by_name or callee in COHERENT_LOADS:
                continue
            o = start + m.end() - 1
            args = split_args(text[o + 1:match_close(text, o)])
            for g in self.by_name[callee]:
                binds = {g.params[i] for i, a in enumerate(args)
                         if i < len(g.params) and self._is_cross(a, local)}
                self._lint_region(g, g.open, g.close, binds, origin, seen)

    def _is_cross_path(self, path: str, local: set) -> bool:
        parts = re.split(r"\s*(?:\.|->)\s*", path)
        return (len(parts) > 1 and parts[-1] in self.cross) or (len(parts) == 1 and parts[0] in local)

    def _is_cross(self, expr: str, local: set) -> bool:
        m = re.match(r"\s*(?:\([^()]*\)\s*)?&?\s*(" + PATH + r")\s*(?:[+\-]|$)", expr)
        return bool(m) and self._is_cross_path(m.group(1), local)

    def run(self) -> list[Finding]:
        self._find_tickets()
        helpers = {fn.name for fn, _, _ in self.tickets if fn.returns_bool}
        seen: set = set()
        for fn in self.functions:
            text = fn.file.text
            for m in re.finditer(r"\b(" + "|".join(map(re.escape, sorted(helpers))) + r")\s*\(",
                                 text[fn.open:fn.close]) if helpers else ():
                at = fn.open + m.start()
                self.sites.append((fn, at, m.group(1)))
                region = self._finishing_region(fn, at, m.group(1))
                if region is None:
                    self._report(fn, at, f"cannot find the finishing path of {m.group(1)}(): use "
                                 "`if (ticket(...)) ...` or `if (!ticket(...)) return;`")
                    continue
                origin = (fn, f"{fn.file.path}:{fn.file.line(at)}")
                self._lint_region(fn, region[0], region[1], set(), origin, seen)
        for (where, path), (kernels, origins) in self._loads.items():
            sites = origins[0] + (f" (and {len(origins) - 1} more)" if len(origins) > 1 else "")
            self.findings.append(Finding(where, ", ".join(sorted(kernels)), f"plain load of "
                                         f"`{path}` (memory other blocks wrote) on the finishing "
                                         f"path of the ticket at {sites}: read it with __ldcg "
                                         "(L1 is not coherent)"))
        if not self.tickets:
            self.findings.append(Finding("csrc/cuda", "-", "no ticket atomic found: the lint "
                                         "would check nothing"))
        return self.findings


def lint_native(root: Path = ROOT, paths: list[Path] | None = None) -> NativeLint:
    lint = NativeLint(paths if paths is not None else cuda_sources(root), root)
    lint.run()
    return lint
