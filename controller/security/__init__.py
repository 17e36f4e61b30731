"""The controller's control-plane security: the keyring, the ZAP handler and admin roles."""
