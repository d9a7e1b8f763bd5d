"""pagoda/loop.py: the label rule of every grid and export."""
from __future__ import annotations

import torch

from pagoda.loop import index_labels


def test_index_labels_image_i_has_class_i_mod_C():
    """Image i is labelled i mod C however the sequence is cut; `class_` labels all; None when unconditional."""
    whole = index_labels(0, 25, 10)
    assert whole.tolist() == [k % 10 for k in range(25)]
    assert torch.equal(torch.cat([index_labels(0, 7, 10), index_labels(7, 18, 10)]), whole)
    assert torch.equal(index_labels(0, 100, 10).view(10, 10), torch.arange(10).repeat(10, 1))  # a 10-wide grid: one class a column
    assert index_labels(3, 4, 10, class_=7).tolist() == [7] * 4
    assert index_labels(0, 4, None) is None and index_labels(0, 4, None, class_=None) is None
