-- Tell apart the Braze workspaces that share this endpoint: each workspace's
-- Currents connector posts to a URL ending in ?workspace=NAME, and its events
-- carry NAME as the custom attribute braze_workspace. An event that already
-- has mParticle's 100 custom attributes is left as it is, and counted.
return {
  process = function(event, out, workspace)
    if not out or not workspace or out.event.event_type ~= "custom_event" then return end
    local data = out.event.data
    local attrs = data.custom_attributes
    if attrs == nil then
      attrs = {}
      data.custom_attributes = attrs
    end
    local n = 0
    for _ in pairs(attrs) do n = n + 1 end
    if n < 100 then
      attrs.braze_workspace = workspace
    else
      tributary.count("workspace_not_tagged")
    end
  end,
  tests = {
    { name = "events of a workspace carry its name", workspace = "brand-a",
      event = { event_type = "users.messages.email.Open", id = "ws-1", time = 1732800000,
                user = { external_user_id = "c-1" } },
      expect = { event = { data = { custom_attributes = { braze_workspace = "brand-a" } } } } },
    { name = "events sent without a workspace carry none",
      event = { event_type = "users.messages.email.Open", id = "ws-2", time = 1732800000,
                user = { external_user_id = "c-1" } },
      expect = { event = { data = { custom_attributes = { braze_workspace = tributary.absent } } } } },
  },
}
