"""The one DIMSE layer: status codes (``status``), the SCU client (``client``) and the storage SCPs
(``storage_scp``: the node's listener and a folder receiver), used by the node, retro, harvest and the demo."""
