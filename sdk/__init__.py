"""The client SDK (imported as ``shimmy.sdk``): the daemon connection, ``Channel``, ``Stream``
and their asyncio forms.  Users import these from ``shimmy``.  Nothing here may import the daemon
(``shimmy.daemon``): tests/test_layers.py holds the layers."""
