"""MetaSchedule tuning for TVM units, with a kept database (TVM 0.27, ``tvm.s_tir.meta_schedule``).

``compile_tuned(mod, target, work_dir, trials)`` extracts the unit's tuning tasks, tunes only the
tasks that have no record in the JSON database under ``work_dir`` yet (re-profiling is then a pure
apply-the-database compile), and compiles with the database applied. ``trials <= 0`` compiles
untuned (TVM's default dlight schedules).

Builder workaround (shared FINDINGS): MetaSchedule's default builder imports
``tvm.s_tir.tensor_intrin`` in every fresh worker; that import alone takes 34-42 s here and hit
the 30 s build timeout, so every candidate failed. ``build_no_intrin`` is the same build without
that import (no x86 tensor intrinsic applies without VNNI/AVX-512 anyway).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TUNED_OPS = ("conv2d", "matmul", "dense")


def build_no_intrin(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule builder function that skips the tensor-intrinsic import (see module doc)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def open_database(work_dir: str | Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir))


def fuse_for_tuning(mod: Any, target: Any) -> Any:
    """Legalize + fuse exactly as ``compile_relax`` does before applying the database.

    ``extract_tasks`` finds tasks only among TIR functions: on a freshly imported module (pure
    Relax ops) it silently returns no task at all.
    """
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = list(rp.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential([
        *dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def missing_tasks(mod: Any, target: Any, db: Any) -> tuple[list[Any], int]:
    """(tasks with no tuning record in ``db``, number of tasks in total)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fuse_for_tuning(mod, target), target)
    # Only the compute-heavy kernels are worth trials; elementwise tasks (an input quantize or
    # dequantize at a precision boundary) keep TVM's default schedule.
    tasks = [t for t in tasks if any(op in t.task_name for op in TUNED_OPS)]
    miss = [t for t in tasks if db.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    return miss, len(tasks)


def tune_tasks(tasks: list[Any], target: Any, work_dir: str | Path, db: Any, trials: int, *,
               rpc: Any = None, build_timeout_s: float = 120.0, run_timeout_s: float = 60.0,
               seed: int = 0) -> None:
    """Tune ``tasks`` (``trials`` candidates each) into ``db``; measure on the RPC board if given."""
    from tvm.s_tir import meta_schedule as ms

    if not tasks:
        return
    # The default population (512) costs ~2 min of evolution per round on this 2-core VM, even
    # for a 2-trial budget: scale it with the budget (512 at >= 64 trials, TVM's default).
    pop = int(min(512, max(16, 8 * trials)))
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=pop, init_min_unmeasured=min(50, pop), genetic_num_iters=4 if trials >= 16 else 1)
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work_dir), strategy=strategy, num_threads=1, seed=seed)
    builder = ms.builder.LocalBuilder(f_build=build_no_intrin, timeout_sec=build_timeout_s, max_workers=1)
    evc = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    if rpc is not None:
        runner: Any = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port,
                                           tracker_key=rpc.key, session_timeout_sec=int(run_timeout_s)),
            evaluator_config=evc, max_workers=1)
    else:
        runner = ms.runner.LocalRunner(timeout_sec=run_timeout_s, evaluator_config=evc)
    ms.tune.tune_tasks(
        tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials * len(ctxs),
        max_trials_per_task=trials, num_trials_per_iter=min(trials, 64), builder=builder, runner=runner,
        database=db, task_scheduler="round-robin")


def compile_tuned(mod: Any, target: Any, work_dir: str | Path | None, trials: int, *, rpc: Any = None,
                  build_timeout_s: float = 120.0) -> tuple[Any, dict[str, Any]]:
    """Compile ``mod`` for ``target``, tuning missing tasks first; returns (executable, info)."""
    import time

    import tvm

    if not work_dir or trials <= 0:
        return tvm.compile(mod, target=target), {"tuned": False, "tasks": 0, "tuned_now": 0}
    from tvm.s_tir import meta_schedule as ms

    db = open_database(work_dir)
    miss, n = missing_tasks(mod, target, db)
    t0 = time.perf_counter()
    if miss:
        log.info("tuning %d/%d tasks, %d trials each", len(miss), n, trials)
        tune_tasks(miss, target, work_dir, db, trials, rpc=rpc, build_timeout_s=build_timeout_s)
    tune_s = time.perf_counter() - t0
    with target:
        ex = ms.relax_integration.compile_relax(db, mod, target, params=None)
    return ex, {"tuned": True, "tasks": n, "tuned_now": len(miss), "tune_s": round(tune_s, 2)}
