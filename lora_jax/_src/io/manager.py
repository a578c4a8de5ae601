"""Step-numbered training checkpoints: adapters, optimiser state and ``extra``, saved async.

Each step directory ``<directory>/<step>`` is an orbax composite with the items of
:func:`lora_jax.save_adapters` (``arrays``, ``meta``, so ``load_adapters`` reads it) and,
when an optimiser state or ``extra`` is given, ``state`` and ``train``
(:mod:`lora_jax._src.io.train_state`). orbax writes a step to a temporary directory and
renames it once complete, so a save killed at any point leaves the previous steps as they
were and the half-written one is never listed; saves run in a background thread (the call
returns once the arrays are copied to host memory). Once a step is on disk (the next
:meth:`save`, :meth:`wait_until_finished`, :meth:`close` or listing of steps) process 0
lists its array files with their SHA-256 (:mod:`lora_jax._src.io.file_manifest`); a step whose
process was killed before that is restored unchecked, as checkpoints of older versions are.

One manager writes to a directory at a time: process 0 holds an ``flock`` on
``<directory>/.lora_jax.lock`` from its first save until :meth:`close`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lora_jax._src.core.rules import LoraRule
from lora_jax._src.io.checkpoint import _pack, _unpack
from lora_jax._src.io.file_manifest import write_manifest
from lora_jax._src.io.safe_ckpt import check_meta_size
from lora_jax._src.io.safe_io import check_declared_bytes
from lora_jax._src.io.train_state import (
    abstract_state,
    check_train_meta,
    nbytes,
    opt_targets,
    pack_train,
    unpack_train,
)

ITEMS = ("arrays", "meta", "state", "train")
LOCK = ".lora_jax.lock"
# tensorstore reports failed writes as ValueError; these mark an I/O failure in its message
_IO_MARKERS = ("os_error_code", "No space left", "Read-only", "Permission denied", "too large")
TMP = ".orbax-checkpoint-tmp"  # orbax's name for a step being written


class AdapterCheckpointManager:
    """Periodic training checkpoints, keeping the last ``max_to_keep`` steps.

    Wraps ``ocp.CheckpointManager``. Each step holds the trainable tree (as
    :func:`lora_jax.save_adapters` writes it), and optionally the optimiser state and
    ``extra`` (data position, PRNG keys), so that a killed run resumes exactly; see
    docs/guides/checkpoints.md. Use it as a context manager or call :meth:`close`.

    Args:
        directory: the run's checkpoint directory (created if missing).
        max_to_keep: keep only the newest steps (``None``: keep all).
        async_save: write in a background thread; :meth:`save` returns once the arrays
            are on the host. Errors of a background write are raised by the next
            :meth:`save`, :meth:`wait_until_finished` or :meth:`close`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> rules = [lj.LoraRule("w", rank=1)]
        >>> frozen, trainable = lj.split({"w": jnp.ones((4, 4))}, rules, key=jax.random.key(0))
        >>> opt = optax.adam(1e-3)
        >>> with lj.checkpoint.AdapterCheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
        ...     for step in range(4):
        ...         _ = mgr.save(step, trainable, rules=rules, base=frozen,
        ...                      opt_state=opt.init(trainable), extra={"position": 8 * step})
        ...     t, o, step, extra = mgr.restore_train_state(
        ...         base=frozen, opt_like=jax.eval_shape(opt.init, trainable))
        >>> mgr.all_steps(), step, extra["position"], int(o[0].count)
        ([2, 3], 3, 24, 0)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )  # leftovers of killed saves are removed once this manager holds the lock
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except OSError as e:
            raise OSError(f"cannot open checkpoint directory {self.directory}: {e}") from e
        self._lock: int | None = None
        self._started = False  # lock taken and leftovers removed (first save)
        self._pending: int | None = None  # the step of the last save started

    # ---- writing ------------------------------------------------------------------------

    def _take_lock(self) -> None:
        """Hold ``<directory>/.lora_jax.lock`` (process 0), refusing a second writer."""
        if jax.process_index() != 0:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks
            return
        path = self.directory / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"{self.directory} is being written by another AdapterCheckpointManager "
                f"(pid {holder}); two writers would mix their runs' steps. Close the other "
                f"one or save this run to another directory."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
        for tmp in self.directory.glob(f"*{TMP}*"):  # saves killed before their commit
            shutil.rmtree(tmp, ignore_errors=True)

    def save(
        self,
        step: int,
        trainable: Any,
        *,
        rules: Sequence[LoraRule] | LoraRule,
        base: Any,
        opt_state: Any = None,
        extra: dict | None = None,
        metadata: dict | None = None,
    ) -> bool:
        """Save one training step (asynchronously unless ``async_save=False``).

        Args:
            step: the step number (greater than every saved step).
            trainable: the trainable tree from :func:`lora_jax.split`.
            rules: the LoraRules used to split.
            base: the frozen tree or its :func:`~lora_jax.checkpoint.fingerprint`.
            opt_state: any optax state of ``trainable`` (``None`` leaves,
                ``optax.MaskedNode`` and empty states are fine).
            extra: a dict of JSON-able values and arrays, PRNG keys included
                (``jax.random.key`` and raw ``uint32`` keys), e.g. the data position.
            metadata: JSON-able dict stored with the adapter (as in ``save_adapters``).

        Returns:
            True (the step was scheduled; a failed write raises).

        Raises:
            ValueError: a step not after the latest saved one, another writer, bad arguments.
            OSError: the directory cannot be written (full disk, read-only); the steps
                saved before are left as they were.
        """
        arrays, meta = _pack(trainable, rules, base, step, metadata)
        items = {"arrays": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None or extra is not None:
            state, train = pack_train(opt_state, extra)
            items["train"] = ocp.args.JsonSave(train)
            if state:
                items["state"] = ocp.args.StandardSave(state)
        self.wait_until_finished()  # the previous save's errors first
        if not self._started:
            try:
                self._take_lock()
            except OSError as e:
                raise self._save_error(step, e) from e
            if jax.process_count() > 1:  # process 0 has removed the leftovers
                multihost_utils.sync_global_devices(f"lora_jax.manager:{self.directory}")
            self._started = True
        if not os.access(self.directory, os.W_OK | os.X_OK):  # before orbax's threads start
            err = PermissionError(f"{self.directory} is not writable (read-only or permissions)")
            raise self._save_error(step, err)
        self._mgr.reload()  # see steps other writers removed
        latest = self._mgr.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"step {step} is not after the latest saved step {latest} in {self.directory}; "
                f"resume from restore_train_state() and continue with step {latest + 1}, or "
                f"save this run to another directory."
            )
        try:
            self._pending = step
            self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # orbax/tensorstore raise many types for failed writes
            raise self._save_error(step, e) from e
        return True

    def _save_error(self, step: int | None, e: BaseException) -> Exception:
        """A failed save, naming the directory and what is still on disk.

        OSError for a failed write (full disk, read-only or vanished directory),
        RuntimeError for anything else orbax refused.
        """
        steps = self._disk_steps()
        kept = f"step {max(steps)} (and {len(steps) - 1} before it)" if steps else "nothing"
        text = f"{type(e).__name__}: {e}"
        io = isinstance(e, OSError) or any(m in text for m in _IO_MARKERS)
        return (OSError if io else RuntimeError)(
            f"saving step {step} to {self.directory} failed: {text}. The checkpoints saved "
            f"before are unchanged ({kept} on disk)"
            + ("; check free space and write permission of the directory." if io else ".")
        )

    def _disk_steps(self) -> list[int]:
        with contextlib.suppress(OSError):
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        return []

    def wait_until_finished(self) -> None:
        """Block until the background save (if any) is on disk; raise OSError if it failed."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending, e) from e
        step, self._pending = self._pending, None
        if step is not None and jax.process_index() == 0 and (self.directory / str(step)).is_dir():
            try:
                write_manifest(self.directory / str(step))  # its files, checked at restore
            except OSError as e:
                raise self._save_error(step, e) from e

    def close(self) -> None:
        """Finish the pending save, release the directory lock and orbax's threads."""
        try:
            self.wait_until_finished()
        finally:
            self._mgr.close()
            if self._lock is not None:
                os.close(self._lock)  # closing releases the flock
                self._lock = None
            self._started = False

    def __enter__(self) -> AdapterCheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- reading ------------------------------------------------------------------------

    def _step(self, step: int | None) -> tuple[int, str]:
        steps = self.all_steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None or step not in steps:
            raise ValueError(
                f"no adapter checkpoint for step {step} in {self.directory}; saved steps: {steps}."
            )
        check_meta_size(self.directory / str(step))
        return step, str(self.directory / str(step))

    def _restore(self, step: int):
        return lambda args: self._mgr.restore(step, args=args)

    def restore(self, step: int | None = None, *, like: Any = None, base: Any = None) -> Any:
        """The trainable tree of ``step`` (default: the latest); see :func:`load_adapters`."""
        step, where = self._step(step)
        return _unpack(self._restore(step), where, like, base)

    def restore_train_state(
        self,
        step: int | None = None,
        *,
        base: Any = None,
        like: Any = None,
        opt_like: Any = None,
    ) -> tuple[Any, Any, int, dict]:
        """``(trainable, opt_state, step, extra)`` of ``step`` (default: the latest).

        Args:
            step: the step to read; ``None`` for the latest.
            base: the frozen tree (or fingerprint) to check the adapter fits.
            like: the trainable tree's shapes, dtypes and shardings (arrays or
                ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape`` of the ``lj.split`` call).
            opt_like: the optimiser state's tree, e.g. ``jax.eval_shape(opt.init,
                trainable)`` (with ``.sharding`` set to restore sharded); required when an
                optimiser state was saved. Leaves are cast to its dtypes.

        Returns:
            The trainable tree, the optimiser state (``None`` if none was saved), the step,
            and ``extra`` (``{}`` if none was saved; PRNG keys come back as keys).

        Raises:
            ValueError: no such step, a damaged file (named), ``opt_like`` or ``base``
                that does not fit.
        """
        step, where = self._step(step)
        trainable = _unpack(self._restore(step), where, like, base)
        restore = self._restore(step)
        if not (self.directory / str(step) / "train").is_dir():
            if opt_like is not None:
                raise ValueError(
                    f"{where} holds no optimiser state (saved without opt_state=); pass "
                    f"opt_like=None and initialise the optimiser."
                )
            return trainable, None, step, {}
        try:
            train = restore(ocp.args.Composite(train=ocp.args.JsonRestore()))["train"]
        except Exception as e:
            raise ValueError(f"cannot read the training state in {where}/train: {e}") from e
        check_train_meta(train, f"{where}/train")
        check_declared_bytes(nbytes(train), f"{where}/train")
        treedef, opt_leaves = None, None
        if train["opt_state"] is not None:
            if opt_like is None:
                raise ValueError(
                    f"{where} holds an optimiser state: pass opt_like="
                    f"jax.eval_shape(optimizer.init, trainable) to restore it."
                )
            treedef, opt_leaves = opt_targets(train, opt_like, where)
        elif opt_like is not None:
            raise ValueError(
                f"{where} holds no optimiser state (saved without opt_state=); pass "
                f"opt_like=None and initialise the optimiser."
            )
        arrays = {}
        targets = abstract_state(train, opt_leaves)
        if targets:
            try:
                arrays = restore(ocp.args.Composite(state=ocp.args.StandardRestore(targets)))
                arrays = arrays["state"]
            except Exception as e:
                raise ValueError(
                    f"cannot read the training state arrays in {where}/state: {e}"
                ) from e
        opt_state, extra = unpack_train(train, arrays, treedef, opt_leaves, where)
        return trainable, opt_state, step, extra

    def latest_step(self) -> int | None:
        """The newest complete step on disk (``None`` for a new run); waits for a pending save."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The complete steps on disk, oldest first; waits for a pending save."""
        self.wait_until_finished()
        self._mgr.reload()
        return sorted(self._mgr.all_steps())
