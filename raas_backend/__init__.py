"""RaaS: reasoning-aware KV-cache sparsity, its policies, kernels and SGLang integration.

This package never imports the gateway (``service``); the kernels and paging logic never
import SGLang, so they run on hosts where SGLang cannot be installed.
"""
