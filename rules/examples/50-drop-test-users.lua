-- Keep internal test accounts out of mParticle, and count how many were dropped
-- (visible as tributary_rule_counts_total{name="test_user_dropped"}).
local function is_test_user(id)
  return type(id) == "string" and (id:sub(1, 5) == "test-" or id:find("@example.com", 1, true) ~= nil)
end

return {
  process = function(event, out)
    local user = event.user
    if user ~= nil and user ~= cjson.null and is_test_user(user.external_user_id) then
      tributary.count("test_user_dropped")
      return false, "internal test user"
    end
  end,
  tests = {
    { name = "test- accounts are dropped",
      event = { event_type = "users.messages.email.Send", id = "t-1", time = 1732800000,
                user = { external_user_id = "test-jane" } },
      expect_drop = "internal test user" },
    { name = "customers pass",
      event = { event_type = "users.messages.email.Send", id = "t-2", time = 1732800000,
                user = { external_user_id = "customer-1234" } },
      expect = { batch = { user_identities = { customer_id = "customer-1234" } } } },
  },
}
