"""cscompile.passes"""
