-- Forward every stable 3D T1-weighted (MPRAGE-like) MR series to the synthmrf node.
-- synthmrf's own results (Manufacturer "synthmrf", derived images) are never forwarded, so results
-- stored back into Orthanc cannot loop. The node applies its own, stricter recognition rules too.

local TARGET = "synthmrf"   -- a key of "DicomModalities" in orthanc.json
local NAME_PATTERNS = { "mp.?rage", "tfl3d", "bravo", "fspgr", "t1.?tfe", "3d.?t1" }

local function looks_like_mprage(description)
  local text = string.lower(description or "")
  for _, pattern in ipairs(NAME_PATTERNS) do
    if string.find(text, pattern) then
      return true
    end
  end
  return false
end

function OnStableSeries(seriesId, tags, metadata)
  local shared = ParseJson(RestApiGet("/series/" .. seriesId .. "/shared-tags?simplify"))
  if (shared["Modality"] or tags["Modality"]) ~= "MR" then
    return
  end
  if string.lower(shared["Manufacturer"] or "") == "synthmrf" then
    return
  end
  local imageType = string.upper(shared["ImageType"] or "")
  if string.find(imageType, "DERIVED") or string.find(imageType, "LOCALIZER") then
    return
  end
  local threeD = (shared["MRAcquisitionType"] or "") == "3D"
  local named = looks_like_mprage(tags["SeriesDescription"]) or looks_like_mprage(shared["ProtocolName"])
  if threeD and named then
    print("synthmrf: forwarding series " .. (tags["SeriesInstanceUID"] or seriesId))
    -- An asynchronous store job (visible under /jobs, retried from there) rather than SendToModality,
    -- which sends inside the Lua callback and blocks Orthanc's other Lua events meanwhile.
    RestApiPost("/modalities/" .. TARGET .. "/store",
                DumpJson({ Resources = { seriesId }, Asynchronous = true, Synchronous = false }, true))
  end
end
