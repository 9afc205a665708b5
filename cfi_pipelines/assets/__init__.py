"""Software-defined assets: the cache views, the campaign exports, the API fallback."""
