-- sandbox escape: registry_via_load
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  -- no way to reach the registry or C functions
  local f = load("return debug")
  if f() ~= nil then error("debug reachable") end
  if package ~= nil or io ~= nil or dofile ~= nil then error("library reachable") end
  if os.execute ~= nil or os.exit ~= nil or os.remove ~= nil then error("os reachable") end
  ctx:route("out", "nothing reachable")
end
