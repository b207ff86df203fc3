"""Publishing a model version: protect (optional), model card, OpenSSF signature (``model.sig``), push."""
