"""The ``vhdx`` command line (installed as the ``vhdx_cli`` package)."""
