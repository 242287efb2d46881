"""Fleet scan: probe thousands of VHDX/AVHDX files in parallel and assemble their chains and trees.

``probe`` reads one file's headers and metadata (no BAT), ``walk`` lists the trees, ``forest`` assembles
chains from the probes alone, ``executor`` runs probes locally or on a Dask cluster, ``scan`` ties them.
"""
