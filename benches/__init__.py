"""Side-by-side benchmarks of vhdx-chain against its peers and against the raw-copy limit.

Run from the repository root: ``python -m benches --quick`` (about two minutes on two cores) or
``python -m benches --full`` (8-32 GiB virtual disks, several GiB written). Every ratio in the output compares
numbers taken in the same run, on the same files, interleaved round by round. They run from a source checkout
and are not part of the wheel; ``vhdx bench`` (the user's own storage) lives in the CLI package.
"""
