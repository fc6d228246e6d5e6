"""cscompile.runtime"""
