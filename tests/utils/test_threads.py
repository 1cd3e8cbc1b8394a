"""torch_threads sets torch's thread count for a block and restores it, also when the block raises."""

import pytest
import torch

from amfor.utils.threads import torch_threads


def test_the_thread_count_is_set_inside_and_restored_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
