"""The reference step on 2 processes x 4 CPU devices (jax.distributed, gloo collectives).

Each process feeds its half of the batch; the adapters are sharded across both
processes (not fully addressable by either), merged and saved with orbax from there,
then restored here on one process. Tolerances as in test_sharding.py: losses and
adapters match the single-device run to ``rtol = atol = 1e-5``; merge matches float64
numpy to 1e-5.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import sharded_step as ss  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path):
    cfg = ss.Config()
    results = ss.launch(str(tmp_path), n_processes=2, devices_per_process=4, timeout=240)
    ref_losses, ref_trainable = ss.run_single(cfg)
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
        assert r["fully_addressable"] is False
        assert r["merged_spec"] == r["base_spec"] == "P('fsdp', 'model')"
        assert r["merge_max_abs_err"] < 1e-5
        assert r["restored_equal"] is True
        np.testing.assert_allclose(r["losses"], ref_losses, **TOL)
    # the checkpoint written by the two processes restores here, onto a different mesh
    mesh = jax.make_mesh((8,), ("fsdp",))
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        ref_trainable,
    )
    restored = ss.restore_adapters(tmp_path / "adapters", like)
    assert isinstance(restored["layer_0"]["attn"]["q"]["kernel"], lj.LoraFactors)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(ref_trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


@pytest.mark.slow
def test_launch_reports_a_failing_process(tmp_path):
    with pytest.raises(RuntimeError, match="process 0 exited with"):
        ss.launch(str(tmp_path), layout="no_such_layout", timeout=120)
