"""Pipeline workers: the processor interface (``processor``), the default pipeline processor
(``pipeline_processor``, the only place the node's code reaches torch) and the worker loop, its process pool
and supervision (``pool``)."""
