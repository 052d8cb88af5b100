return { apps = { ["app-ios"] = "ios", ["app-web"] = "web" } }
