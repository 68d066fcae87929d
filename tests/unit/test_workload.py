"""The workload facts shared by the server's flags and central mode."""

from __future__ import annotations

import pytest

from extproc.workload import LabelsError, node_id, parse_labels, spiffe_id


def test_labels_parse_with_spaces_and_empty_items() -> None:
    assert parse_labels(" app = cart , version=v2,, ") == {"app": "cart", "version": "v2"}
    assert parse_labels("") == {}
    assert parse_labels("empty=") == {"empty": ""}


@pytest.mark.parametrize("text", ["app", "=cart", " =x", "a=b,c"])
def test_bad_labels_name_their_flag(text: str) -> None:
    with pytest.raises(LabelsError, match=r"^--workload: expected k=v\[,k=v\.\.\.\], got "):
        parse_labels(text, "--workload")


def test_spiffe_id_and_node_id() -> None:
    assert spiffe_id("cluster.local", "shop", "cart") == "spiffe://cluster.local/ns/shop/sa/cart"
    assert spiffe_id("cluster.local", "shop", "") == ""
    assert node_id("cart-v1", "shop") == "sidecar~cart-v1.shop"
    assert node_id("", "shop") == "sidecar~unknown.shop"
