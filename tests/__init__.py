"""loramux tests: they mirror the packages (kernels, adapters, server/{api,engine,model,train}, loadtest)."""
