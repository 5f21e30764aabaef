"""The ticket lint (bench/lint_tickets.py): the CUDA source and the Triton kernels pass it, and it
fails, naming the kernel and the line, on each bug it is there for: a deleted fence, a plain load
on a finishing path, a relaxed ticket. The bugs are injected into synthetic snippets and into
copies of csrc/ (never into the real kernels)."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import requires_triton

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import lint_tickets  # noqa: E402
import lint_tickets_cuda  # noqa: E402

TOY = """
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v));
  return old;
}
__device__ bool ticket(int* counter, int count, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *flag = atomic_add_acq_rel(counter, 1) == count - 1;
  }
  __syncthreads();
  return *flag != 0;
}
struct Ws {
  float* parts;
  int* ticket;
};
Ws carve(Carver c) {
  Ws w;
  w.parts = c.data(64);
  return w;
}
__device__ float total(const float* a, int count) {
  float s = 0.0f;
  for (int i = 0; i < count; ++i) s += __ldcg(a + i);
  return s;
}
__global__ void toy_kernel(Ws w, float* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) w.parts[blockIdx.x] = 1.0f;
  if (!ticket(w.ticket, gridDim.x, &flag)) return;
  if (threadIdx.x == 0) *out = total(w.parts, gridDim.x) + __ldcg(w.parts);
}
__global__ void toy_if_kernel(Ws w, float* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) w.parts[blockIdx.x] = 2.0f;
  if (ticket(w.ticket, gridDim.x, &flag) && threadIdx.x == 0) {
    *out = __ldcg(w.parts + 1);
  }
}
"""


def _lint_toy(tmp_path, old=None, new=None):
    text = TOY if old is None else TOY.replace(old, new, 1)
    assert old is None or text != TOY, old
    path = tmp_path / "toy.cuh"
    path.write_text(textwrap.dedent(text))
    return lint_tickets_cuda.lint_native(tmp_path, [path])


def _line_of(needle, old=None, new=None):
    text = TOY if old is None else TOY.replace(old, new, 1)
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_the_cuda_source_passes_and_the_lint_sees_every_ticket():
    lint = lint_tickets_cuda.lint_native()
    assert [str(f) for f in lint.findings] == []
    assert [(fn.name, atomic) for fn, _, atomic in lint.tickets] == [("last_arrival",
                                                                       "atomic_add_acq_rel")]
    assert lint.atomics["atomic_add_acq_rel"] == "acq_rel"  # read from device.cuh's PTX
    sites = {(str(fn.file.path), fn.name) for fn, _, _ in lint.sites}
    for where in (("csrc/cuda/lomo_update.cu", "lomo_update_kernel"),
                  ("csrc/cuda/grad_accumulate.cu", "grad_accumulate_kernel"),
                  ("csrc/cuda/adalomo_stats.cuh", "finish_cols"),
                  ("csrc/cuda/adalomo_flat.cuh", "flat_finish")):
        assert where in sites, sites
    assert len(lint.sites) >= 11 and lint.coherent_reads >= 15, (lint.sites, lint.coherent_reads)


def test_a_correct_toy_passes(tmp_path):
    lint = _lint_toy(tmp_path)
    assert lint.findings == [] and len(lint.sites) == 2 and lint.coherent_reads == 3


@pytest.mark.parametrize("old, new, needle, kernel, words", [
    ("    __threadfence();\n", "", "atomic_add_acq_rel(counter", "toy_if_kernel, toy_kernel",
     "no __threadfence() before it"),
    ("    __threadfence();\n    *flag", "    if (count > 1) __threadfence();\n    *flag",
     "atomic_add_acq_rel(counter", "toy_kernel", "no __threadfence() before it"),
    ("  __syncthreads();\n  if (threadIdx.x == 0) {", "  if (threadIdx.x == 0) {",
     "__threadfence();", "toy_kernel", "no __syncthreads() before it"),
    ("atom.acq_rel.gpu", "atom.relaxed.gpu", "atomic_add_acq_rel(counter", "toy_kernel",
     "is relaxed and no __threadfence() follows it"),
    ("s += __ldcg(a + i)", "s += a[i]", "s += a[i]", "toy_kernel", "plain load of `a`"),
    ("+ __ldcg(w.parts);", "+ *w.parts;", "+ *w.parts;", "toy_kernel", "plain load of `w.parts`"),
    ("*out = __ldcg(w.parts + 1);", "*out = __ldg(w.parts + 1);", "__ldg(w.parts + 1)",
     "toy_if_kernel", "plain load of `w.parts`"),
    ("*out = __ldcg(w.parts + 1);", "*out = *(w.parts + 1);", "*(w.parts + 1)",
     "toy_if_kernel", "plain load of `w.parts`"),
])
def test_each_bug_is_named_with_its_kernel_and_line(tmp_path, old, new, needle, kernel, words):
    lint = _lint_toy(tmp_path, old, new)
    found = [str(f) for f in lint.findings]
    assert len(found) == 1, found
    assert found[0].startswith(f"toy.cuh:{_line_of(needle, old, new)}: "), found
    assert kernel in found[0] and words in found[0], found


def test_an_unrecognised_finishing_path_is_a_finding(tmp_path):
    lint = _lint_toy(tmp_path, "if (!ticket(w.ticket, gridDim.x, &flag)) return;",
                     "if (!ticket(w.ticket, gridDim.x, &flag)) *out = 0.0f;")
    assert any("cannot find the finishing path of ticket()" in str(f) for f in lint.findings)


# bug: (file, text, its replacement, (file, text) locating the line the finding names in the
# injected copy, words of the finding); the line is looked up, not written down, so that edits of
# the kernels elsewhere do not break the test
REAL_BUGS = {
    "fence deleted": ("reduce.cuh", "    __threadfence();\n    const bool last", "    const bool last",
                      ("reduce.cuh", "const bool last = atomic_add_acq_rel"),
                      "no __threadfence() before it"),
    "sum_in_order plain": ("reduce.cuh", "acc += __ldcg(a + i)", "acc += a[i]",
                           ("reduce.cuh", "acc += a[i]"), "plain load of `a`"),
    "LOMO's call-level sum plain": ("lomo_update.cu", "acc += __ldcg(c.gsq_slots + j)",
                                    "acc += c.gsq_slots[j]",
                                    ("lomo_update.cu", "acc += c.gsq_slots[j]"),
                                    "plain load of `c.gsq_slots`"),
    "AdaLomo row partials plain": ("adalomo_stats.cuh", "__ldcg(a.ws.rowpart + cb * rows + row)",
                                   "a.ws.rowpart[cb * rows + row]",
                                   ("adalomo_stats.cuh", "a.ws.rowpart[cb * rows + row]"),
                                   "plain load of `a.ws.rowpart`"),
    "relaxed ticket": ("device.cuh", "atom.acq_rel.gpu.global", "atom.relaxed.gpu.global",
                       ("reduce.cuh", "const bool last = atomic_add_acq_rel"),
                       "is relaxed and no __threadfence() follows it"),
}


def _line_in_copy(root, name, text) -> str:
    lines = (root / "csrc" / "cuda" / name).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, (name, text, hits)
    return f"csrc/cuda/{name}:{hits[0]}"


@pytest.mark.parametrize("bug", sorted(REAL_BUGS))
def test_bugs_injected_into_a_copy_of_the_kernels_are_found(tmp_path, bug):
    name, old, new, anchor, words = REAL_BUGS[bug]
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    path = tmp_path / "csrc" / "cuda" / name
    assert old in path.read_text(), bug
    path.write_text(path.read_text().replace(old, new, 1))
    where = _line_in_copy(tmp_path, *anchor)
    found = [str(f) for f in lint_tickets_cuda.lint_native(tmp_path).findings]
    assert len(found) == 1 and found[0].startswith(where + ":") and words in found[0], found


TRITON_TOY = '''
import triton
import triton.language as tl


@triton.jit
def take(ws_ptr, count):
    tl.debug_barrier()
    return tl.atomic_add(ws_ptr, 1, sem="acq_rel") == count - 1


@triton.jit
def _toy_kernel(ws_ptr, out_ptr, count):
    tl.store(ws_ptr + 1 + tl.program_id(0), 1)
    if take(ws_ptr, count):
        tl.store(out_ptr, tl.load(ws_ptr + 1, cache_modifier=".cg"))
'''


def _lint_triton_toy(tmp_path, old=None, new=None):
    text = TRITON_TOY if old is None else TRITON_TOY.replace(old, new, 1)
    path = tmp_path / "toy_kernels.py"
    path.write_text(text)
    return lint_tickets.lint_triton_source([path], tmp_path)


def test_triton_source_rules_on_a_toy(tmp_path):
    good = _lint_triton_toy(tmp_path)
    assert good.findings == [] and good.ticket_kernels == {"_toy_kernel": ["take"]}
    relaxed = _lint_triton_toy(tmp_path, 'sem="acq_rel"', 'sem="relaxed"')
    assert [str(f) for f in relaxed.findings] == [
        "toy_kernels.py:9: take: tl.atomic_add with sem='relaxed': a ticket needs sem=\"acq_rel\""]
    unset = _lint_triton_toy(tmp_path, ', sem="acq_rel"', "")
    assert [str(f) for f in unset.findings] == [
        "toy_kernels.py:9: take: tl.atomic_add with sem=None: a ticket needs sem=\"acq_rel\""]
    no_barrier = _lint_triton_toy(tmp_path, "    tl.debug_barrier()\n", "")
    assert len(no_barrier.findings) == 1 and "without a tl.debug_barrier()" in str(
        no_barrier.findings[0])


def test_triton_source_of_the_real_kernels():
    src = lint_tickets.lint_triton_source(sorted((ROOT / "triton_kernels").glob("*.py")))
    assert src.findings == [] and src.atomics >= 1
    assert {"_lomo_update_kernel", "_lomo_update_multi_kernel", "_adalomo_stats_kernel",
            "_vector_kernel", "_grad_accumulate_kernel"} <= set(src.ticket_kernels)


def test_ptx_check_names_a_relaxed_atom():
    n, bad = lint_tickets.ptx_ticket_findings("_k", "call", "atom.global.gpu.acq_rel.add.u32 %r1;"
                                              "\natom.global.gpu.relaxed.add.u32 %r2;")
    assert n == 2 and [str(f) for f in bad] == [
        "PTX of call: _k: atom.global.gpu.relaxed.add.u32 is not acq_rel (the ticket neither "
        "releases this program's partials nor acquires the others')"]


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


def _compile_env():
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    return dict(os.environ, TRITON_INTERPRET="0")  # compile, not interpret


@requires_triton
def test_every_triton_ticket_compiles_to_an_acq_rel_atom_for_sm90():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "lint_tickets.py"), "--triton"],
                         env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for kernel in ("_lomo_update_kernel", "_lomo_update_multi_kernel", "_adalomo_stats_kernel",
                   "_adalomo_unorm_kernel", "_vector_kernel", "_vector_multi_kernel",
                   "_grad_accumulate_kernel"):
        assert f"{kernel} " in run.stdout, run.stdout


_COMPILE_TOY = """
import sys, triton
from triton.backends.compiler import GPUTarget
sys.path[:0] = sys.argv[1:3]
import lint_tickets, toy_kernels
src = triton.compiler.ASTSource(toy_kernels._toy_kernel,
                                {"ws_ptr": "*i32", "out_ptr": "*i32", "count": "i32"}, {})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
n, bad = lint_tickets.ptx_ticket_findings("_toy_kernel", "toy", ptx)
print(n, *bad, sep="\\n")
"""


@requires_triton
@pytest.mark.parametrize("sem, bad", [("acq_rel", 0), ("relaxed", 1)])
def test_a_relaxed_triton_ticket_is_found_in_its_ptx(tmp_path, sem, bad):
    (tmp_path / "toy_kernels.py").write_text(TRITON_TOY.replace('sem="acq_rel"', f'sem="{sem}"'))
    run = subprocess.run([sys.executable, "-c", _COMPILE_TOY, str(tmp_path), str(ROOT / "bench")],
                         env=_compile_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "1" and len(lines) == 1 + bad, lines
    if bad:
        assert lines[1].startswith("PTX of toy: _toy_kernel: atom.global.gpu.relaxed"), lines
