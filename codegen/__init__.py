"""cscompile.codegen"""
