"""Pages of the review app: scripts that ``main.py`` runs through ``st.navigation`` (not imported).

This file makes the folder a package only so that a wheel ships the page scripts.
"""
