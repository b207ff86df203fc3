"""Publishing a committed version (``publish.py``): copy it, protect it with MergeLock if the policy says so, sign it
(OpenSSF model signing, ``model.sig``), push it to a local folder or a Hub repo (``hub.py``), and record it."""
