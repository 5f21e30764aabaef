"""The cases the default run (README's `python -m pytest -q -rs tests`) leaves out, besides those
marked slow in their files: chosen from `--durations=0` so that the default run takes minutes on
a 2-core CPU. Each is marked ``extended`` at collection (conftest.py); CI runs them (its `-m`
replaces the default one), and a pattern that matches no collected test fails a run of the whole
folder (a renamed test must not leave the list silently).

Patterns are ``fnmatch`` patterns on node ids."""

EXTENDED = {
    # subprocesses, torchrun and whole trainings: the same paths run in-process at small sizes
    "tests/test_bench_memory.py::test_every_case_on_a_tiny_model*": "every case in a subprocess",
    "tests/test_bench_memory.py::test_a_case_over_its_limit_does_not_fit*": "a subprocess",
    "tests/test_fsdp.py::*": "torchrun, 2 processes",
    "tests/test_golore_fsdp.py::*": "torchrun, 2 processes",
    "tests/test_bench_smoke.py::*": "every benchmark end to end (one module fixture)",
    "tests/test_bench_convergence.py::*": "a training per optimizer (one module fixture)",
    "tests/test_bench_whole_step.py::*": "whole training steps of every variant",
    "tests/test_finetune.py::test_cli_prints_progress_and_summary*": "a subprocess",
    "tests/test_finetune.py::test_demo_reduces_loss*": "a training",
    "tests/test_finetune.py::test_bf16_lomo_stochastic_rounding_runs*": "a training",
    "tests/test_finetune.py::test_gradient_checkpointing_flag_end_to_end*": "a training",
    "tests/test_fuzz_backends.py::*": "hypothesis examples on every backend",
    "tests/test_gpu_check.py::*": "the GPU one-shot's dry run in subprocesses",
    "tests/test_docs_examples.py::test_bash_blocks_run[docs/gpu-verification.md*": "subprocesses",
    "tests/test_docs_numbers.py::test_check_fails_*": "the renderer in subprocesses",
    "tests/test_lint_tickets.py::test_every_triton_ticket_compiles_*": "Triton's sm_90 compiler",
    "tests/test_bench_clip_modes.py::*": "a training per clipping mode",
    "tests/test_golore_counterexample.py::*": "trainings of three optimizers",
    "tests/test_selfcheck.py::test_the_doctor_runs_as_a_new_user_would*": "a subprocess",
    "tests/test_launch_count.py::test_llama3_8b_step*": "an 8B-shaped step on meta tensors",
    # compiled-code reads (cuobjdump, Triton's sm_90 compiler)
    "tests/test_triton_compile.py::*": "compiles every Triton kernel for sm_90",
    "tests/test_static_budgets.py::test_every_cuda_kernel_meets_its_static_budget*": "cuobjdump",
    # LLM sizes: the same properties run at small and odd sizes in the default run
    "tests/test_llm_shapes.py::test_adalomo[*": "LLM-sized tensors",
    "tests/test_llm_shapes.py::test_unaligned_views[*": "LLM-sized tensors",
    "tests/test_oracle_llm_sizes.py::*": "25M-element tensors",
    "tests/test_adalomo_update.py::*-278011-*": "large flat tensors",
    "tests/test_adalomo_update.py::*-130x4096-*": "LLM-row-sized tensors",
    "tests/test_op_contract.py::test_stages_on_shards_match_the_one_call_update[*": "every shard",
    # optimizer-level tests through the Triton interpreter (NumPy, seconds per update); the
    # Triton kernels' op-level properties stay in the default run
    "tests/test_optim_batching.py::*triton*": "the Triton interpreter",
    "tests/test_optim_grad_norm.py::*triton*": "the Triton interpreter",
    "tests/test_optim_accumulation.py::*triton*": "the Triton interpreter",
    "tests/test_adalomo_update.py::test_matches_reference_and_float64[triton*": "the interpreter",
    "tests/test_adalomo_update.py::test_non_finite_gradient_changes_nothing[triton*": "the interpreter",
    "tests/test_triton_adalomo_update.py::test_adalomo_many_partials[*": "the interpreter",
    "tests/test_op_contract.py::test_workspace_reuse_is_bitwise_stable[*triton*": "the interpreter",
}
