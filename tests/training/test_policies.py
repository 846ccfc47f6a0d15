"""The trainer's policies on their own: when the Checkpointer saves, when the Validator evaluates."""

from train_common import tiny_cfg

from neox_l2e.training.checkpointer import Checkpointer
from neox_l2e.training.validator import Validator


def test_checkpointer_saves_every_factor_and_at_extra_iters_but_not_at_the_last_step(tmp_path):
    ck = Checkpointer(tiny_cfg(train_iters=12, save=str(tmp_path), checkpoint_factor=4, extra_save_iters=[3, 12]), None)
    try:
        assert [i for i in range(1, 13) if ck.should_save(i)] == [3, 4, 8]
        assert ck.should_save_at_end(interrupted=False)
        assert ck.should_save_at_end(interrupted=True)  # save-on-interrupt defaults to true
        assert not ck.resuming and ck.saved_first_train_samples() is None
    finally:
        ck.close()
    off = Checkpointer(tiny_cfg(train_iters=12, save=str(tmp_path), save_on_interrupt=False), None)
    off.close()
    assert not off.should_save_at_end(interrupted=True) and off.should_save_at_end(interrupted=False)
    none = Checkpointer(tiny_cfg(train_iters=12, checkpoint_factor=4), None)
    assert not any(none.should_save(i) for i in range(1, 13)) and not none.should_save_at_end(False)


def test_validator_evaluates_every_interval_but_not_at_the_last_step():
    class Engine:
        module = None

    v = Validator(tiny_cfg(train_iters=10, eval_interval=3), None, {}, Engine(), [], None, [], None)
    assert [i for i in range(1, 11) if v.should_evaluate(i)] == [3, 6, 9]
    assert v.evaluate("valid") is None and v.run(3) is None and v.measure_heldout() is None
