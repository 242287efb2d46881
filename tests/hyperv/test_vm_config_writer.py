from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.hyperv_oracle import STORAGE_SAMPLES, XML_SAMPLES, dissect_tree, sample
from vhdx.errors import InvalidRequestError
from vhdx.hyperv.config import read_config
from vhdx.hyperv.config.writer import build_storage, write_storage


@pytest.mark.peer
@pytest.mark.parametrize("name", STORAGE_SAMPLES + XML_SAMPLES)
def test_rewritten_sample_reads_back_the_same_tree_with_both_readers(tmp_path, name):
    tree = read_config(str(sample(name))).root
    out = tmp_path / "out.vmcx"
    write_storage(str(out), tree)
    assert read_config(str(out)).root == tree
    assert dissect_tree(out) == tree


@pytest.mark.peer
def test_large_strings_and_arrays_go_to_file_objects_that_both_readers_follow(tmp_path):
    tree = {"configuration": {"notes": "n" * 5000, "blob": bytes(range(256)) * 40, "small": "s"}}
    out = tmp_path / "big.vmcx"
    write_storage(str(out), tree)
    assert read_config(str(out)).root == tree
    assert dissect_tree(out) == tree


def test_writer_refuses_to_replace_an_existing_file(tmp_path):
    out = tmp_path / "x.vmcx"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_storage(str(out), {"configuration": {}})
    assert out.read_bytes() == b"keep"


def test_writer_refuses_values_it_cannot_store():
    with pytest.raises(InvalidRequestError, match="list"):
        build_storage({"configuration": {"x": [1, 2]}})


keys = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1,
               max_size=20).filter(lambda k: len(k.encode()) < 255)
leaves = (st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
          | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | st.binary(max_size=40))
trees = st.recursive(leaves, lambda kids: st.dictionaries(keys, kids, max_size=6), max_leaves=40)


@pytest.mark.peer
@given(tree=st.dictionaries(keys, st.dictionaries(keys, trees, max_size=6), min_size=1, max_size=3))
def test_any_tree_of_root_nodes_round_trips_through_writer_and_both_readers(tmp_path_factory, tree):
    out = tmp_path_factory.mktemp("rt") / "t.vmcx"
    write_storage(str(out), tree)
    assert read_config(str(out)).root == tree
    assert dissect_tree(out) == tree
