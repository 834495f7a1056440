"""MetaSchedule tuning for TVM units, with a kept database (TVM 0.27, ``tvm.s_tir.meta_schedule``).

A :class:`Tuner` belongs to one process (the profiling worker, or a benchmark): it extracts the
tuning tasks of unit modules, drops those already in the JSON database under ``work_dir`` and
those seen before in this process (tasks are keyed by the structural hash of their TIR, so w2..w8
at a8 and the two input forms of a unit share one conv task), and tunes the rest. The builder and
runner pools and the XGBoost cost model are created once and kept: the cost model needs ~100
measured samples before it guides the search at all, so a model shared across tasks is what
makes a 64-trial budget per task worth more than random sampling for all but the first tasks.
``compile_tuned(mod, target, work_dir, trials)`` is the one-unit entry point; ``trials <= 0``
compiles untuned (TVM's default schedules).

Two workarounds for this 2-core x86 host (shared FINDINGS, notes/tvm.md):

- The builder: MetaSchedule's default build imports ``tvm.s_tir.tensor_intrin`` in every fresh
  worker (34-42 s, over the 30 s build timeout); ``build_no_intrin`` skips it.
- ``TuneContext.__init__`` does the same import in the tuning process (34 s at load 0.4). On llvm
  targets the design space here is built explicitly (TVM's generic CPU rules + lcpaq's own int8
  intrinsic), which never looks up TVM's intrinsics: :func:`skip_tensor_intrin` stubs the module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Task names of the kernels worth trials. The layout transforms are those of the AVX2 int8 path
# (tvm_lower): without a schedule they run as scalar loops next to a ~1 ms tensorized conv.
TUNED_OPS = ("conv2d", "matmul", "dense", "layout_transform", "transpose")
HEAVY_OPS = ("conv2d", "matmul", "dense")  # the rest of TUNED_OPS: elementwise (TuneConfig.elementwise_trials)
_INTRIN_MODULE = "tvm.s_tir.tensor_intrin"


@dataclass(frozen=True)
class TuneConfig:
    """How hard to search per task. ``population`` 0 = scale with ``trials`` (see ``strategy``)."""

    trials: int = 64  # measured candidates per task
    # candidates per elementwise task (layout transforms and requantize epilogues, no conv/matmul);
    # 0 = ``trials``. A whole-model build brings dozens of new fused epilogues (each layer's
    # requantize fused with its neighbours' converts and the residual add): a few trials each
    # give them a vectorized schedule at a fraction of the time
    elementwise_trials: int = 0
    # more task-name parts worth trials (elementwise): the NCHWc epilogue path's requantize kernels
    # (``fused_cast_multiply_add_relu_quantize``) are scalar loops without a schedule
    extra_ops: tuple[str, ...] = ()
    trials_per_iter: int = 32  # candidates per search round: 2 rounds at 64, the 2nd guided
    population: int = 0
    genetic_iters: int = 3
    # TVM's default also samples an explicit unroll of 512 steps: those candidates cost 1-11 s of
    # LLVM time each to build here and never ranked first in our conv tasks; 16 did.
    unroll_max_steps: tuple[int, ...] = (0, 16, 64)
    threads: int = 2  # search threads and build workers (the host has 2 cores)
    build_timeout_s: float = 120.0
    run_timeout_s: float = 60.0
    seed: int = 0


def build_no_intrin(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule builder function that skips the tensor-intrinsic import (see module doc)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def needs_tensor_intrin(target: Any) -> bool:
    """True when tuning for ``target`` may use TVM's own registered tensor intrinsics.

    On llvm targets :meth:`Tuner.space` builds the rule list itself from TVM's generic CPU rules
    plus lcpaq's int8 intrinsic (tvm_lower), so TVM's intrinsics are never looked up there.
    """
    return str(target.kind.name) != "llvm"


def int8_intrin_kind(target: Any) -> str | None:
    """Which lcpaq int8 tensor intrinsic applies to ``target``: "vnni" (AVX-512 VNNI), "avx2",
    or None (not x86, or neither feature)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return None
    try:
        if codegen.target_has_features("avx512vnni", target):
            return "vnni"
        if codegen.target_has_features("avx2", target):
            return "avx2"
    except Exception:  # noqa: BLE001 - a triple LLVM does not know
        return None
    return None


@contextlib.contextmanager
def skip_tensor_intrin(target: Any) -> Iterator[None]:
    """Stub ``tvm.s_tir.tensor_intrin`` while tuning context objects are built for ``target``.

    Scoped: the stub is removed on exit, so a later real import (a user's code, a VNNI target)
    still works. A no-op when the module is already imported or the target needs it.
    """
    if _INTRIN_MODULE in sys.modules or needs_tensor_intrin(target):
        yield
        return
    stub = types.ModuleType(_INTRIN_MODULE, "lcpaq stub: no x86 int8 tensor intrinsic applies here")
    sys.modules[_INTRIN_MODULE] = stub
    try:
        yield
    finally:
        if sys.modules.get(_INTRIN_MODULE) is stub:
            del sys.modules[_INTRIN_MODULE]


def target_tag(target: Any) -> str:
    """A directory name for ``target``, e.g. ``llvm-znver5`` (or ``llvm-<hash>`` with -mattr etc.)."""
    import hashlib

    d = {k: str(v) for k, v in dict(target.export()).items() if k not in ("num-cores", "tag", "keys")}
    name = f"{d.pop('kind', 'llvm')}-{d.pop('mcpu', 'generic')}"
    rest = {k: v for k, v in d.items() if v not in ("", "[]", "{}", "None", "0")}
    return name if not rest else f"{name}-{hashlib.sha256(str(sorted(rest.items())).encode()).hexdigest()[:8]}"


def open_database(work_dir: str | Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    from lcpaq.profiler.tvm_lower import INT8_INTRINS, register_int8_intrin

    for kind in INT8_INTRINS:  # loading a record replays its trace: its intrinsic must exist
        register_int8_intrin(kind)
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


def heavy_tasks(mod: Any, target: Any, extra_ops: Sequence[str] = ()) -> list[Any]:
    """The conv/matmul tuning tasks of a Relax module.

    Only the compute-heavy kernels are worth trials; elementwise tasks (an input quantize or
    dequantize at a precision boundary) keep TVM's default schedule.
    """
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fuse_for_tuning(mod, target), target)
    return [t for t in tasks if any(op in t.task_name for op in (*TUNED_OPS, *extra_ops))]


def task_key(task: Any) -> int:
    """Structural hash of a task's TIR (what the JSON database matches records on)."""
    import tvm_ffi

    return int(tvm_ffi.structural_hash(task.dispatched[0]))


class Tuner:
    """Tunes tasks into one kept database, reusing pools and the cost model across calls."""

    def __init__(self, target: Any, work_dir: str | Path, config: TuneConfig = TuneConfig(), *,
                 rpc: Any = None) -> None:
        self.target, self.config, self.rpc = target, config, rpc
        # one database per target: MetaSchedule's JSON database matches records on the workload
        # only, so a znver3 schedule would silently be applied to a znver5 build
        self.work_dir = Path(work_dir) / target_tag(target)
        self.db = open_database(self.work_dir)
        self._tuned: set[int] = set()  # tasks tuned (or found tuned) in this process
        self._pools: tuple[Any, Any, Any] | None = None
        self.tune_s = 0.0
        self.tasks_tuned = 0
        self.adopted = 0  # tasks given a similar workload's faster schedule (_adopt_best_similar)
        self._by_args: dict[tuple, list[Any]] | None = None

    def missing(self, mods: Sequence[Any]) -> tuple[list[Any], int]:
        """(unique tasks of ``mods`` with no record in the database, number of unique tasks)."""
        seen: dict[int, Any] = {}
        for mod in mods:
            for t in heavy_tasks(mod, self.target, self.config.extra_ops):
                seen.setdefault(task_key(t), t)
        for k, t in seen.items():
            if k not in self._tuned:
                self._adopt_best_similar(t)
        miss = {k: t for k, t in seen.items() if k not in self._tuned
                and self.db.query_tuning_record(t.dispatched[0], self.target, t.task_name) is None
                and not self._reuse_twin(t)}
        self._tuned.update(k for k in seen if k not in miss)
        return list(miss.values()), len(seen)

    def _similar(self) -> dict[tuple, list[Any]]:
        """The database's records by argument shapes and dtypes (rebuilt after each tuning run)."""
        if self._by_args is None:
            self._by_args = {}
            for rec in self.db.get_all_tuning_records():
                if rec.args_info is not None and rec.run_secs:
                    self._by_args.setdefault(_args_sig(rec.args_info), []).append(rec)
        return self._by_args

    def _adopt_best_similar(self, task: Any) -> bool:
        """Give ``task`` the fastest schedule known for the same loop nest with other constants.

        A kernel with inline scalar constants (a requantize scale, a zero point) is a different
        workload for every calibration, so each whole-model build tuned its own copy: resnet18's
        int16 stem conv with its fused epilogue came out 3.0-4.3 ms across 20 mixed policies
        (64 trials each), its table unit 3.0 ms. Here the database's records with the same argument
        shapes are tried fastest first; the first whose trace applies to this task and that beats
        the task's own record by > 3 % is committed for it. Returns whether one was."""
        from tvm import s_tir
        from tvm.s_tir import meta_schedule as ms

        mod = task.dispatched[0]
        (_, fn), = mod.functions.items()
        try:
            sig = _args_sig(ms.arg_info.ArgInfo.from_prim_func(fn))
        except Exception:  # noqa: BLE001 - not a plain tensor-argument PrimFunc
            return False
        own = self.db.query_tuning_record(mod, self.target, task.task_name)
        own_s = _secs(own) if own is not None else float("inf")
        import tvm_ffi

        for rec in sorted(self._similar().get(sig, []), key=_secs)[:4]:
            if _secs(rec) >= own_s * 0.97:
                return False
            if tvm_ffi.structural_equal(rec.workload.mod, mod):
                continue
            try:
                rec.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
            except Exception:  # noqa: BLE001 - another loop nest with the same argument shapes
                continue
            self.db.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, self.db.commit_workload(mod), rec.run_secs, self.target, rec.args_info))
            self.adopted += 1
            return True
        return False

    def _reuse_twin(self, task: Any) -> bool:
        """A kernel marked opaque (``op_pattern`` 8, tvm_lower's NCHWc-epilogue path) is the same
        loop nest as its fusable twin (``op_pattern`` 4) but hashes differently: copy the twin's
        record, when the database has one and its trace applies, instead of tuning it again."""
        from tvm import s_tir
        from tvm.s_tir import meta_schedule as ms

        mod = task.dispatched[0]
        (gv, fn), = mod.functions.items()
        if fn.attrs is None or int(fn.attrs.get("op_pattern", -1)) != 8:
            return False
        import tvm

        twin = tvm.IRModule({gv: fn.with_attr("op_pattern", 4)})
        rec = self.db.query_tuning_record(twin, self.target, task.task_name)
        if rec is None:
            return False
        try:
            rec.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
        except Exception:  # noqa: BLE001 - the trace does not fit: tune it
            return False
        self.db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, self.db.commit_workload(mod), rec.run_secs, self.target, rec.args_info))
        return True

    def strategy(self, trials: int | None = None) -> Any:
        from tvm.s_tir import meta_schedule as ms

        c = self.config
        trials = c.trials if trials is None else trials
        # TVM's default population is 512; its evolution cost ~2 min per round on this loaded
        # 2-core VM. 128 at 64 trials: ~5 s per round at load 3-4 (256: ~17 s, load 5).
        pop = c.population or int(min(512, max(16, 2 * trials)))
        return ms.search_strategy.EvolutionarySearch(
            population_size=pop, init_min_unmeasured=min(50, pop),
            genetic_num_iters=c.genetic_iters if trials >= 16 else 1)

    def space(self) -> Any:
        """TVM's default CPU design space, with ``config.unroll_max_steps`` as the unroll choices."""
        from tvm.s_tir import meta_schedule as ms

        if str(self.target.kind.name) != "llvm":
            return "post-order-apply"
        rules, postprocs = [], list(ms.postproc.Postproc.create("llvm"))
        for r in ms.schedule_rule.ScheduleRule.create("llvm"):
            name = type(r).__name__
            if name == "ParallelizeVectorizeUnroll":
                r = ms.schedule_rule.ParallelizeVectorizeUnroll(
                    max_jobs_per_core=16, max_vectorize_extent=64,
                    unroll_max_steps=list(self.config.unroll_max_steps), unroll_explicit=True)
            elif name == "MultiLevelTiling" and int8_intrin_kind(self.target):
                # what TVM does for its VNNI targets, with lcpaq's int8 intrinsic (tvm_lower): tiles
                # the blocks it matches (the NCHWc int8 conv), the plain rule covers the others
                from lcpaq.profiler.tvm_lower import register_int8_intrin

                rules.append(ms.schedule_rule.MultiLevelTilingWithIntrin(
                    register_int8_intrin(int8_intrin_kind(self.target)), structure="SSRSRS", tile_binds=None, max_innermost_factor=64,
                    vector_load_lens=None, reuse_read=None,
                    reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")))
                postprocs.insert(-1, ms.postproc.RewriteTensorize(vectorize_init_loop=True))
            rules.append(r)
        # all three explicit: if any is "from-target", TVM builds the target's full default set,
        # which names its own VNNI intrinsic on AVX-512 VNNI targets (not registered: stubbed)
        return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                                 mutator_probs=dict(ms.mutator.Mutator.create("llvm")))

    def _get_pools(self) -> tuple[Any, Any, Any]:
        if self._pools is None:
            from tvm.s_tir import meta_schedule as ms

            c = self.config
            builder = ms.builder.LocalBuilder(f_build=build_no_intrin, timeout_sec=c.build_timeout_s,
                                              max_workers=c.threads)
            evc = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
            if self.rpc is not None:
                runner: Any = ms.runner.RPCRunner(
                    rpc_config=ms.runner.RPCConfig(
                        tracker_host=self.rpc.host, tracker_port=self.rpc.port, tracker_key=self.rpc.key,
                        session_timeout_sec=int(c.run_timeout_s)),
                    evaluator_config=evc, max_workers=1)
            else:
                runner = ms.runner.LocalRunner(timeout_sec=c.run_timeout_s, evaluator_config=evc)
            cost = ms.cost_model.XGBModel(num_tuning_cores=c.threads)
            self._pools = (builder, runner, cost)
        return self._pools

    def tune(self, tasks: Sequence[Any]) -> float:
        """Tune ``tasks`` into the database (``config.trials`` candidates per conv/matmul task,
        ``config.elementwise_trials`` per elementwise one); returns seconds."""
        if not tasks:
            return 0.0
        c = self.config
        t0 = time.perf_counter()
        light = [t for t in tasks if not any(op in t.task_name for op in HEAVY_OPS)]
        heavy = [t for t in tasks if any(op in t.task_name for op in HEAVY_OPS)]
        if not c.elementwise_trials or c.elementwise_trials == c.trials:
            heavy, light = list(tasks), []
        for group, trials in ((heavy, c.trials), (light, c.elementwise_trials)):
            if group:
                self._tune_group(group, trials)
        self._tuned.update(task_key(t) for t in tasks)
        self._by_args = None  # new records
        dt = time.perf_counter() - t0
        self.tune_s += dt
        self.tasks_tuned += len(tasks)
        return dt

    def _tune_group(self, tasks: Sequence[Any], trials: int) -> None:
        from tvm.s_tir import meta_schedule as ms

        c = self.config
        log.info("tuning %d tasks, %d trials each", len(tasks), trials)
        with skip_tensor_intrin(self.target):
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                list(tasks), str(self.work_dir), space=self.space(), strategy=self.strategy(trials),
                num_threads=c.threads,
                seed=c.seed)
        builder, runner, cost = self._get_pools()
        ms.tune.tune_tasks(
            tasks=ctxs, task_weights=weights, work_dir=str(self.work_dir),
            max_trials_global=trials * len(ctxs), max_trials_per_task=trials,
            num_trials_per_iter=min(trials, c.trials_per_iter), builder=builder, runner=runner,
            database=self.db, cost_model=cost, task_scheduler="round-robin")

    def compile(self, mod: Any) -> tuple[Any, dict[str, Any]]:
        """Tune the missing tasks of ``mod``, then compile it with the database applied."""
        import tvm  # noqa: F401
        from tvm.s_tir import meta_schedule as ms

        miss, n = self.missing([mod])
        tune_s = self.tune(miss)
        if int8_intrin_kind(self.target):  # records that use the intrinsic are replayed here
            from lcpaq.profiler.tvm_lower import register_int8_intrin

            register_int8_intrin(int8_intrin_kind(self.target))
        with self.target:
            ex = ms.relax_integration.compile_relax(self.db, mod, self.target, params=None)
        return ex, {"tuned": True, "tasks": n, "tuned_now": len(miss), "tune_s": round(tune_s, 2)}


def _args_sig(args_info: Any) -> tuple:
    return tuple((tuple(int(d) for d in a.shape), str(a.dtype)) for a in args_info)


def _secs(rec: Any) -> float:
    return float(sum(float(v) for v in rec.run_secs) / max(len(rec.run_secs), 1))


def compile_tuned(mod: Any, target: Any, work_dir: str | Path | None, trials: int, *, rpc: Any = None,
                  tuner: Tuner | None = None) -> tuple[Any, dict[str, Any]]:
    """Compile ``mod`` for ``target``, tuning missing tasks first; returns (executable, info)."""
    import tvm

    if not work_dir or trials <= 0:
        return tvm.compile(mod, target=target), {"tuned": False, "tasks": 0, "tuned_now": 0}
    tuner = tuner or Tuner(target, work_dir, TuneConfig(trials=trials), rpc=rpc)
    return tuner.compile(mod)
