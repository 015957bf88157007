"""mitmcache: a shared HTTP cache (RFC 9111) as a mitmproxy addon."""
