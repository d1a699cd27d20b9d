local codes = lookup.load("codes.csv")
function on_message(msg, ctx)
  local what = ctx.message_id
  if what == "csv" then
    local r = codes["XR01"]
    local again = lookup.load("codes.csv") == codes
    ctx:route("out", { name = r.name, modality = r.modality, quoted = codes["CT,1"].name,
                       missing = codes["MR9"].modality, cached = again })
  elseif what == "json" then
    local j = lookup.load("map.json")
    ctx:route("out", { ae = j.destinations[2].ae, n = #j.destinations })
  elseif what == "slash" then
    lookup.load("../api.lua")
  elseif what == "dotdot" then
    lookup.load("..codes.csv")
  elseif what == "abs" then
    lookup.load("/etc/passwd")
  elseif what == "ext" then
    lookup.load("api.lua")
  end
end
