"""Which CLIP layer each brain area matches: RDMs, RSA, linear CKA, ridge encoding models, noise ceilings."""
