-- sandbox escape: load_bytecode
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local chunk = "\27LuaT\0\25\147\r\n\26\n\4\8\8xV\0\0\0\0\0\0\0\0\0\0\0(w@\1"
  local f, err = load(chunk, "x", "b")
  if f then f() ctx:route("out", "LOADED") end
  local g, err2 = load(function() local c = chunk chunk = nil return c end)
  if g then g() ctx:route("out", "LOADED") end
  error(tostring(err) .. " / " .. tostring(err2))
end
