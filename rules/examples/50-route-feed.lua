-- Send a platform's events to another feed: this workspace has no Web input in
-- mParticle, so web events go to the Unbound feed (without a device platform).
return {
  process = function(event, out)
    if out and out.feed == "web" then
      out.feed = "unbound"
      out.batch.device_info.platform = nil
    end
  end,
  tests = {
    { name = "web events travel on the unbound feed",
      event = { event_type = "users.messages.inappmessage.Click", id = "w-1", time = 1732800000,
                user = { external_user_id = "c-1" }, properties = { platform = "web" } },
      expect = { feed = "unbound", batch = { device_info = { platform = tributary.absent } } } },
    { name = "ios events stay on ios",
      event = { event_type = "users.messages.inappmessage.Click", id = "i-1", time = 1732800000,
                user = { external_user_id = "c-1" }, properties = { platform = "ios" } },
      expect = { feed = "ios" } },
  },
}
