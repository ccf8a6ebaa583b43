"""DICOMweb (PS3.18) on the client side: one HTTP layer (http.py) shared by the router's STOW-RS destinations and
the back-fill's QIDO-RS / WADO-RS source. The router's own STOW-RS server is utils/routing/intake/stow.py."""
