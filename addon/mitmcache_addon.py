"""Entry file for ``mitmdump -s addon/mitmcache_addon.py``.

mitmproxy loads a *file*, not a package (mitmproxy-notes A3); while it imports this file
its directory is first on sys.path, so the ``mitmcache`` package next to it is found even
without installing it.
"""

from mitmcache.addons import MitmCache

addons = [MitmCache()]
