"""keye.registry: the decorator every plug-in table (rewards, losses, formats, shapes) is filled with."""

import pytest

from keye.data.world.render import SHAPE_MASKS
from keye.eval.formats import FORMATS
from keye.registry import registrar
from keye.train.rewards import REWARDS
from keye.train.rl_losses import POLICY_LOSSES


def test_registrar_files_the_function_unchanged_and_refuses_a_taken_name():
    table: dict = {}
    register = registrar(table)

    def double(x):
        return 2 * x

    assert register("double")(double) is double
    assert table == {"double": double}
    with pytest.raises(ValueError, match="'double' is already registered"):
        register("double")(lambda x: x)
    assert table["double"] is double  # the first entry survives a refused registration


def test_toolkit_tables_are_filled_through_it():
    assert {"circle", "square", "triangle"} <= set(SHAPE_MASKS)
    assert {"accuracy", "format"} <= set(REWARDS)
    assert {"gspo", "gspo_token"} <= set(POLICY_LOSSES)
    assert {"videomme", "mvbench", "world"} <= set(FORMATS)
